"""Train a tiny model for one step on each of the sister paper's perception tasks, in one
process (vLLM is imported once), exactly as `train_grpo.py --task TASK ...` does:

    python tests/run_tasks_worker.py MODEL_DIR TASK_DATA_ROOT OUT_ROOT

TASK_DATA_ROOT holds one folder per task (demo/demo_data.py --task all); each run writes
OUT_ROOT/<task>/metrics.jsonl."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tyro  # noqa: E402

import data  # noqa: E402
import train_grpo as T  # noqa: E402


def main(model: str, root: str, out: str) -> None:
    data.quiet_libraries()
    for task in ("grounding", "counting", "ocr", "detection"):
        argv = ["--task", task, "--model", model, "--dataset", f"{root}/{task}/train.jsonl",
                "--val_dataset", f"{root}/{task}/test.jsonl", "--val_every", "1", "--dtype", "float32",
                "--max_pixels", "50176", "--max_prompt_length", "1024", "--max_response_length", "32",
                "--prompts_per_step", "4", "--group_size", "4", "--micro_batch_size", "16", "--max_steps", "1",
                "--learning_rate", "1e-3", "--warmup_ratio", "0", "--output_dir", f"{out}/{task}",
                "--sample_every", "1", "--save_every", "0"]
        T.main(tyro.cli(T.Args, args=argv))


if __name__ == "__main__":
    main(*sys.argv[1:4])
