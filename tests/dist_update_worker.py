"""One GRPO update of the tiny model on 16 fixed responses, under `accelerate launch` with any
number of processes (each takes its contiguous share). Used by test_train_grpo.py to check that
the update is the same for 1 and 2 processes (one token-mean over the whole batch).

    python -m accelerate.commands.launch --cpu --num_processes 2 tests/dist_update_worker.py MODEL DEMO OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_grpo as T  # noqa: E402


def fixed_samples(model_dir: str, demo_dir: str, n: int = 16) -> tuple[list[dict], int]:
    """n responses to one demo prompt with very different lengths (3 to 3 + 5(n-1) tokens) and
    advantages, identical in every process."""
    from transformers import AutoProcessor

    import data

    processor = AutoProcessor.from_pretrained(model_dir)
    row = data.load_rows(str(Path(demo_dir) / "train.jsonl"))[0]
    imgs = data.row_images(row, 3136, 50_176)
    enc = processor(text=[data.build_prompt(processor, row["problem"], 1)], images=imgs, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        comp = torch.randint(10, 600, (3 + 5 * i,), generator=g).tolist()
        samples.append({"prompt_ids": enc["input_ids"][0].tolist(), "completion_ids": comp,
                        "vllm_logps": [0.0] * len(comp), "pixel_values": enc["pixel_values"],
                        "mm_token_type_ids": enc["mm_token_type_ids"][0].tolist(),
                        "image_grid_thw": enc["image_grid_thw"],
                        "advantage": float(torch.randn((), generator=g))})
    return samples, processor.tokenizer.pad_token_id


def update_results(model_dir: str, demo_dir: str) -> dict:
    """{loss aggregation: {"loss": the logged loss, "params": updated parameters}} on this process's share."""
    from accelerate import Accelerator
    from transformers import AutoModelForImageTextToText

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    samples, pad = fixed_samples(model_dir, demo_dir)
    share = len(samples) // world
    local_samples = samples[rank * share:(rank + 1) * share]
    result = {}
    for agg in ("token-mean", "seq-mean-token-mean"):
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        model, opt, sched = accelerator.prepare(model, opt, sched)
        # micro-batches of 3: the 8 local responses end in a short last micro-batch; the second
        # aggregation also encodes the shared image once per micro-batch (--vision_once under DDP)
        args = T.Args(micro_batch_size=3, loss_agg=agg, max_grad_norm=1e9, vision_once=agg != "token-mean")
        stats = T.train_on_batch(model, None, opt, sched, accelerator, local_samples, args, pad)
        # the logged loss: each process's share, averaged over processes (as step_metrics does)
        loss = accelerator.reduce(torch.tensor([stats["loss"]]), reduction="mean")
        params = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])
        result[agg] = {"loss": float(loss), "params": params.clone()}
    return result


def main(model_dir: str, demo_dir: str, out_path: str) -> None:
    from accelerate import PartialState

    result = update_results(model_dir, demo_dir)
    if PartialState().is_main_process:
        torch.save(result, out_path)
    PartialState().wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
