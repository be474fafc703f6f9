"""Benchmark: pushing the policy's weights into the colocated vLLM engine
(train_grpo.sync_weights_to_vllm) against a plain copy of the same tensors into same-shaped
buffers, the least any weight sync must do. Goal (the project's issue): <= 2x.

    .venv/bin/python benchmarks/bench_weight_sync.py                      # ~100M-parameter Qwen2.5-VL
    .venv/bin/python benchmarks/bench_weight_sync.py --hidden_size 128 --num_layers 2   # the tiny model

The model is the tiny Qwen2.5-VL of demo/tiny_model.py widened and deepened (head_dim 64, random
weights, float32), so the sync moves a realistic amount of data while the engine still runs on
CPU. Each side is timed `repeats` times after one warm-up; the medians are reported, the ratio last.

A third timing, vLLM's own `reload_weights` called with the same tensors and nothing of ours,
separates our overhead from vLLM's: on the CPU backend most of a reload is vLLM re-packing every
linear layer for oneDNN (`create_onednn_mm_handler`), which no caller can avoid.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclasses.dataclass
class Args:
    hidden_size: int = 1024
    """language-model width (head_dim 64); the vision tower stays tiny"""
    num_layers: int = 8
    """language-model layers"""
    repeats: int = 5
    """timed repetitions of each side (medians reported)"""
    model: str = ""
    """an existing model folder to use instead of building one"""


def main(args: Args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import data

    data.quiet_libraries()
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForImageTextToText

    import train_grpo as T
    from demo.tiny_model import build_tiny_model

    folder = args.model or str(build_tiny_model(Path(tempfile.mkdtemp()) / "model", 0, hidden_size=args.hidden_size,
                                                num_layers=args.num_layers))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = accelerator.prepare(model)
    llm = T.build_vllm(T.Args(model=folder, max_prompt_length=512, max_response_length=64), 0, 1, 1)
    state = {k: v.detach() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    buffers = {k: torch.empty_like(v) for k, v in state.items()}

    def plain_copy():
        for k, v in state.items():
            buffers[k].copy_(v)

    def median_time(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def bare_reload():  # vLLM's own floor: its reload_weights with the same tensors, nothing of ours
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})

    sync_s = median_time(lambda: T.sync_weights_to_vllm(accelerator, model, llm))
    bare_s = median_time(bare_reload)
    copy_s = median_time(plain_copy)
    gib = sum(v.numel() * v.element_size() for v in state.values()) / 2 ** 30
    print(f"model: {n_params:,} parameters ({gib:.2f} GiB float32)")
    print(f"sync_weights_to_vllm:      {sync_s:.3f} s ({gib / sync_s:.2f} GiB/s)")
    print(f"bare vLLM reload_weights:  {bare_s:.3f} s ({gib / bare_s:.2f} GiB/s)")
    print(f"plain copy:                {copy_s:.3f} s ({gib / copy_s:.2f} GiB/s)")
    print(f"ratio sync/bare reload: {sync_s / bare_s:.2f} (our overhead over vLLM's own weight loading)")
    print(f"ratio sync/copy: {sync_s / copy_s:.2f} (goal <= 2.00)")
    return {"sync_s": sync_s, "bare_s": bare_s, "copy_s": copy_s, "ratio": sync_s / copy_s, "params": n_params}


if __name__ == "__main__":
    main(tyro.cli(Args))
