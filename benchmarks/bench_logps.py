"""Benchmark: token log-probs of a micro-batch, ours (chunked logit - logsumexp with a hand-written
backward, train_grpo.token_logps) against the naive full log-softmax, forward + backward.

Both compute log softmax(logits / tau)[target] for N rows x T tokens over a vocabulary of V and
back-propagate a weighted sum of them into the logits. The naive way materialises (N, T, V)
log-probabilities (and keeps them for backward); ours keeps one float32 (chunk, V) block at a
time and writes the gradient straight into one tensor shaped like the logits. Goal (the
project's issue): peak extra memory <= 0.25x naive, time <= 1x.

    .venv/bin/python benchmarks/bench_logps.py                      # N=4, T=2048, V=151,665 (Qwen2.5-VL)
    .venv/bin/python benchmarks/bench_logps.py --n 2 --t 512 --v 32000 --device cuda

Each variant runs in a fresh process (CPU peak memory is the process's peak resident set size,
CUDA's is torch.cuda.max_memory_allocated). "Extra" is the peak minus the memory in use once the
logits exist. It includes the gradient of the logits (the logits' size), which any method hands
to the LM head's backward; the goal is stated on the memory beyond it ("beyond the gradient"),
and both are printed, then the ratios last.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Args:
    n: int = 4
    """rows (sequences) in the micro-batch"""
    t: int = 2048
    """completion tokens per row"""
    v: int = 151_665
    """vocabulary size (Qwen2.5-VL: 151,665 tokens in the tokenizer)"""
    dtype: str = "float32"
    """logits dtype: float32 (CPU) or bfloat16 (GPU autocast)"""
    device: str = "cpu"
    """cpu or cuda"""
    repeats: int = 3
    """timed repetitions (the median is reported)"""
    variant: str = ""
    """internal: run one variant (ours | naive) in this process and print its JSON"""


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def run_variant(args: Args) -> dict:
    """One variant in this process: time and peak memory of forward + backward."""
    import torch

    sys.path.insert(0, str(ROOT))
    from train_grpo import token_logps

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    logits = torch.randn(args.n, args.t, args.v, dtype=dtype, device=args.device).requires_grad_()
    targets = torch.randint(0, args.v, (args.n, args.t), device=args.device)
    weights = torch.randn(args.n, args.t, device=args.device)

    def step():
        if args.variant == "ours":
            lp = token_logps(logits, targets, 1.0)
        else:  # naive: the full (N, T, V) log-softmax, kept for backward
            lp = logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        (lp * weights).sum().backward()

    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_bytes(args.device)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        logits.grad = None  # the next repetition allocates its gradient again, as training does
    return {"variant": args.variant, "time_s": sorted(times)[len(times) // 2],
            "extra_bytes": max(0, _peak_bytes(args.device) - base), "logits_bytes": logits.numel() * logits.element_size()}


def main() -> None:
    args = tyro.cli(Args)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("naive", "ours"):
        cmd = [sys.executable, __file__, "--variant", variant, "--n", str(args.n), "--t", str(args.t), "--v",
               str(args.v), "--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2 ** 30
    print(f"N={args.n} T={args.t} V={args.v} {args.dtype} on {args.device}; logits {results['ours']['logits_bytes'] / gib:.2f} GiB")
    for r in results.values():
        r["beyond_grad"] = max(0, r["extra_bytes"] - r["logits_bytes"])
    for name, r in results.items():
        print(f"{name:>6}: forward+backward {r['time_s']:.3f} s, peak extra memory {r['extra_bytes'] / gib:.2f} GiB "
              f"({r['beyond_grad'] / gib:.2f} GiB beyond the logits' gradient)")
    mem_all = results["ours"]["extra_bytes"] / max(results["naive"]["extra_bytes"], 1)
    mem = results["ours"]["beyond_grad"] / max(results["naive"]["beyond_grad"], 1)
    speed = results["ours"]["time_s"] / results["naive"]["time_s"]
    print(f"ratio ours/naive: peak extra memory {mem:.3f} beyond the gradient (goal <= 0.25; "
          f"{mem_all:.3f} with it), time {speed:.3f} (goal <= 1.00)")


if __name__ == "__main__":
    main()
