"""Benchmark: rollouts through train_grpo.generate_rollouts against a bare llm.generate of the same
prompts, images and sampling parameters (n, temperature, top-p, max tokens, seeds, the log-prob
of each sampled token, the ban on vision tokens). What is measured is our overhead: building the
requests (fresh multimodal cache keys), per-prompt seeds, and turning vLLM's outputs into token
id and log-prob lists. Goal (the project's issue): >= 0.9x the bare throughput (tokens/s).

    .venv/bin/python benchmarks/bench_rollout.py        # 16 prompts x 8 samples x 96 tokens, tiny model

The tiny model and demo problems are built offline. Both sides run on one engine, alternately,
`repeats` times each after a warm-up, with the multimodal cache cleared before every run (so
neither reuses the other's vision encodings); medians are reported, the ratio last.
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
    prompts: int = 16
    """prompts per rollout batch"""
    group_size: int = 8
    """samples per prompt"""
    max_tokens: int = 96
    """response length, tokens"""
    repeats: int = 3
    """timed runs of each side (medians reported)"""
    model: str = ""
    """a model folder (default: build the tiny model)"""


def main(args: Args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import data

    data.quiet_libraries()
    from transformers import AutoProcessor
    from vllm import SamplingParams

    import train_grpo as T
    from demo.demo_data import generate
    from demo.tiny_model import build_tiny_model

    tmp = Path(tempfile.mkdtemp())
    folder = args.model or str(build_tiny_model(tmp / "model", 0))
    rows = data.load_rows(str(generate(tmp / "demo", num_train=args.prompts, num_test=0, parquet=False) / "train.jsonl"))
    targs = T.Args(model=folder, max_prompt_length=1024, max_response_length=args.max_tokens, max_pixels=50_176,
                   group_size=args.group_size)
    processor = AutoProcessor.from_pretrained(folder)
    images = [data.row_images(r, targs.min_pixels, targs.max_pixels) for r in rows]
    prompts = [data.row_prompt(processor, r, len(im)) for r, im in zip(rows, images)]
    banned = T.vision_token_ids(processor.tokenizer)
    llm = T.build_vllm(targs, 0, 1, 1)

    def ours(k: int) -> int:
        ids, _ = T.generate_rollouts(llm, prompts, images, targs, f"ours{k}", banned, n=args.group_size, seed=k)
        return sum(len(c) for c in ids)

    def bare(k: int) -> int:
        requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
        params = [SamplingParams(n=args.group_size, temperature=targs.temperature, top_p=targs.top_p,
                                 max_tokens=args.max_tokens, logprobs=0, seed=k + i * args.group_size,
                                 logit_bias={t: -100.0 for t in banned}) for i in range(len(prompts))]
        return sum(len(o.token_ids) for out in llm.generate(requests, params, use_tqdm=False) for o in out.outputs)

    rates = {"ours": [], "bare": []}
    for k in range(args.repeats + 1):
        for name, fn in (("ours", ours), ("bare", bare)):
            llm.reset_mm_cache()
            t0 = time.perf_counter()
            tokens = fn(k)
            if k:  # the first round warms up
                rates[name].append(tokens / (time.perf_counter() - t0))
    ours_rate, bare_rate = (sorted(rates[n])[len(rates[n]) // 2] for n in ("ours", "bare"))
    print(f"{args.prompts} prompts x {args.group_size} samples x <= {args.max_tokens} tokens")
    print(f"generate_rollouts: {ours_rate:,.0f} tokens/s")
    print(f"bare llm.generate: {bare_rate:,.0f} tokens/s")
    print(f"ratio ours/bare throughput: {ours_rate / bare_rate:.3f} (goal >= 0.90)")
    return {"ours_tokens_s": ours_rate, "bare_tokens_s": bare_rate, "ratio": ours_rate / bare_rate}


if __name__ == "__main__":
    main(tyro.cli(Args))
