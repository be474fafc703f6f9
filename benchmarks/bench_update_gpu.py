"""Benchmark: the GRPO update phase of train_grpo.py on the real Qwen2.5-VL-3B architecture.

What it measures
    One update = `train_grpo.train_on_batch` itself: collate -> forward_logps (logits_to_keep,
    chunked token log-probs) -> policy_loss -> backward, accumulated over micro-batches -> gradient
    clipping -> AdamW step. Nothing of the rollout side (vLLM, rewards, weight sync) is included.
    The model is a *randomly initialised* Qwen2.5-VL with the published Qwen2.5-VL-3B-Instruct
    sizes (3,754,622,976 parameters), built offline from its config values (no hub, no weights:
    speed and memory do not depend on the values of the weights). As in `build_policy`: float32
    master weights, bf16 compute through accelerate's mixed_precision (autocast), AdamW at the
    official lr 1e-6 and weight decay 1e-3, gradient checkpointing on (`--gradient_checkpointing`).
    Inputs are synthetic samples in the format `train_grpo.collate` reads: every sequence is
    `--seq_len` tokens (default 2,048) = a prompt holding one image (default 448x448 pixels = 32x32
    patches = 256 image tokens, between <|vision_start|> and <|vision_end|>) + a completion of
    `--completion_len` tokens (default 1,024); random token ids, random pixels, random advantages.
    One update is run to warm up (kernels, allocator, AdamW state), then `--steps` are timed.

Run
    GPU (one H100, defaults: 3B model, 16 sequences of 2,048 tokens per update in micro-batches
    of 4, 5 timed updates, peak 989 TFLOP/s = H100 SXM bf16 dense):
        python benchmarks/bench_update_gpu.py
        python benchmarks/bench_update_gpu.py --peak_tflops 989 --micro_batch_size 2   # other sizes
        python benchmarks/bench_update_gpu.py --group_size 4                  # groups of 4 share an image,
        python benchmarks/bench_update_gpu.py --group_size 4 --vision_once    # ... encoded once (compare)
    CPU (toy model, 0.5M parameters, float32, no autocast; seconds per update, most of the run is
    imports; tests/test_bench_update_gpu.py runs an even smaller one in-process through `run(args)`):
        python benchmarks/bench_update_gpu.py --preset toy --seq_len 256 --completion_len 64 \\
            --num_samples 4 --micro_batch_size 2 --steps 2

What it prints
    the setup, then
      tokens/s        all tokens of all sequences (prompt, image and completion tokens) of the timed
                      updates / their wall-clock seconds (torch.cuda.synchronize() around the timer)
      MFU             model FLOP utilisation = 6 * N * tokens/s / (peak_tflops * 1e12), N = every
                      parameter of the model ("n/a" on CPU)
      peak memory     torch.cuda.max_memory_allocated() over the warm-up and timed updates on GPU;
                      on CPU the peak resident set size of the whole process (getrusage)
    and last:  tokens/s X, MFU Y%, peak memory Z GiB

How to read the MFU
    6 * N * tokens is the usual rule (forward 2N + backward 4N FLOPs per token). It is not exact
    for this model, in both directions:
      1. It leaves out attention (QK^T and AV): for the 3B defaults that adds about 4% to the
         6N count (36 causal layers of 2,048 tokens; the windowed vision attention adds 0.2%).
      2. It charges every parameter on every token, but the vision tower (0.67B of the 3.75B)
         runs on 1,024 patches per sequence, not 2,048 tokens; the embedding table (0.31B) is a
         lookup, not a matmul; and the tied lm_head runs only on the 1,025 positions that
         `logits_to_keep` keeps: together about 13% of the 6N count that is not done.
    Net, the rule *over*-states the model FLOPs of the default setting by about 10% (4.61e13
    counted vs 4.19e13 per sequence), so the MFU printed is an estimate, not a lower bound. The
    recomputation of gradient checkpointing (one more forward, ~2N per token) is not counted, as
    usual for MFU (it is hardware FLOPs, not model FLOPs).

Memory on the GPU (an estimate, not yet measured on a GPU; the script prints the real peak)
    float32 weights, gradients and the two AdamW moments: 4 x 3.75e9 x 4 bytes = 56 GiB, plus a
    transient ~14 GiB during the AdamW step (PyTorch's default "foreach" implementation keeps
    sqrt(v) for all parameters at once), plus activations (checkpointed layer inputs, the kept
    logits). About 70 GiB: it should fit an 80 GB H100; `--micro_batch_size` is the knob.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_grpo as T  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Model configurations
# ---------------------------------------------------------------------------------------------
# "3b": the published config.json values of Qwen/Qwen2.5-VL-3B-Instruct, spelt for transformers
# 5.x: the published `rope_scaling: {"type": "mrope", "mrope_section": [16, 24, 24]}` and
# `rope_theta` become `rope_parameters` (as in demo/tiny_model.py), and the vision tower's
# published `in_chans` is `in_channels`. Token ids are the published ones (151643 <|endoftext|>
# is Qwen's pad token; 151654 <|vision_pad|> is banned in sampling like the other vision tokens).
# "toy": demo/tiny_model.py's sizes (head_dim 64, M-RoPE [8, 12, 12]) with tied embeddings like
# the 3B, for a seconds-long CPU run; its special tokens sit at the top of a 1,024-token vocabulary.
PRESETS = {
    "3b": {
        "text": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, hidden_act="silu",
                     max_position_embeddings=128000, rms_norm_eps=1e-6, initializer_range=0.02,
                     rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                      "mrope_section": [16, 24, 24]},
                     use_sliding_window=False, sliding_window=32768, max_window_layers=70,
                     attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
                       tokens_per_second=2),
        "ids": dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653),
        "vision_pad_id": 151654, "pad_id": 151643, "first_special_id": 151643, "image_size": 448,
    },
    "toy": {
        "text": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, hidden_act="silu",
                     max_position_embeddings=4096, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                      "mrope_section": [8, 12, 12]},
                     bos_token_id=1016, eos_token_id=1018, tie_word_embeddings=True),
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=128,
                       fullatt_block_indexes=[1], hidden_act="silu"),
        "ids": dict(image_token_id=1022, video_token_id=1023, vision_start_token_id=1019, vision_end_token_id=1020),
        "vision_pad_id": 1021, "pad_id": 1016, "first_special_id": 1016, "image_size": 112,
    },
}


@dataclasses.dataclass
class Args:
    preset: Literal["3b", "toy"] = "3b"
    """model sizes: "3b" = the published Qwen2.5-VL-3B-Instruct config; "toy" = demo/tiny_model.py's sizes (CPU test)"""
    seq_len: int = 2048
    """tokens per sequence, prompt (with the image tokens) + completion"""
    completion_len: int = 1024
    """completion tokens per sequence (the positions that get logits and a loss)"""
    image_size: int | None = None
    """side of the one square image per sequence, pixels, a multiple of 28 (None: the preset's,
    448 for "3b" = 256 image tokens, 112 for "toy" = 16)"""
    num_samples: int = 16
    """sequences per update (one rollout batch of one process)"""
    group_size: int = 1
    """consecutive sequences that share one prompt and image, as the G samples of a GRPO group do
    (1: every sequence its own image)"""
    vision_once: bool = False
    """train_grpo --vision_once: each shared image through the vision tower once per micro-batch"""
    micro_batch_size: int = 4
    """sequences per forward/backward (train_grpo --micro_batch_size; default 4 as there)"""
    steps: int = 5
    """timed updates"""
    warmup: int = 1
    """untimed updates first"""
    gradient_checkpointing: bool = True
    """recompute activations in backward (train_grpo --gradient_checkpointing)"""
    peak_tflops: float = 989.0
    """accelerator peak for the MFU, TFLOP/s (989 = H100 SXM bf16 dense, no sparsity)"""
    cpu: bool = False
    """run on the CPU even when a GPU is present (float32, no autocast)"""
    seed: int = 0
    """seed of the random weights and the synthetic samples"""


def build_config(preset: str):
    """Qwen2_5_VLConfig of a preset (see PRESETS)."""
    from transformers import Qwen2_5_VLConfig

    p = PRESETS[preset]
    return Qwen2_5_VLConfig(text_config=dict(p["text"]), vision_config=dict(p["vision"]), **p["ids"],
                            tie_word_embeddings=p["text"]["tie_word_embeddings"])


def build_model(preset: str, seed: int, device: str = "cpu"):
    """Randomly initialised Qwen2.5-VL in float32 (master weights, as build_policy), seeded;
    created directly on `device` (3.75B parameters would take a minute to initialise on a CPU)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(build_config(preset))
    return model.to(torch.float32)


def synthetic_samples(preset: str, num_samples: int, seq_len: int, completion_len: int, image_size: int,
                      seed: int, group_size: int = 1) -> list[dict]:
    """Samples as `train_grpo.build_samples` makes them, with random content.

    prompt_ids: a text head, <|vision_start|>, h*w/4 image tokens, <|vision_end|>, a text tail,
    seq_len - completion_len tokens in all; pixel_values (h*w, 3*2*14*14) for an image grid
    (t, h, w) = (1, image_size/14, image_size/14) patches (a still image is one temporal patch);
    mm_token_type_ids 1 on the image tokens; completion_len random completion ids; vllm_logps 0
    (only logged); a random advantage per sample. Each run of `group_size` consecutive samples
    shares one prompt and one pixel_values tensor (as build_samples shares a prompt's encoding).
    """
    p = PRESETS[preset]
    vis, ids = p["vision"], p["ids"]
    unit = vis["patch_size"] * vis["spatial_merge_size"]
    if image_size % unit:
        raise ValueError(f"image_size={image_size} must be a multiple of {unit} (patch 14 x merge 2)")
    h = w = image_size // vis["patch_size"]
    num_image_tokens = h * w // vis["spatial_merge_size"] ** 2
    prompt_len = seq_len - completion_len
    free = prompt_len - num_image_tokens - 2  # text tokens around the vision block
    if completion_len < 1 or free < 0:
        raise ValueError(f"seq_len={seq_len} - completion_len={completion_len} = {prompt_len} prompt tokens "
                         f"cannot hold the {num_image_tokens} image tokens + 2 vision markers")
    head = min(20, free)  # a system turn and the start of the user turn come before the image
    patch_dim = vis["in_channels"] * vis["temporal_patch_size"] * vis["patch_size"] ** 2
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, p["first_special_id"], (n,), generator=g).tolist()  # noqa: E731
    samples = []
    for i in range(num_samples):
        if i % group_size:  # same prompt and image objects as the group's first sample
            samples.append({**samples[-1], "completion_ids": text(completion_len),
                            "advantage": float(torch.randn((), generator=g))})
            continue
        prompt = (text(head) + [ids["vision_start_token_id"]] + [ids["image_token_id"]] * num_image_tokens
                  + [ids["vision_end_token_id"]] + text(free - head))
        samples.append({
            "prompt_ids": prompt,
            "mm_token_type_ids": [int(t == ids["image_token_id"]) for t in prompt],
            "pixel_values": torch.randn(h * w, patch_dim, generator=g),  # (t*h*w, 3*2*14*14)
            "image_grid_thw": torch.tensor([[1, h, w]]),
            "completion_ids": text(completion_len),
            "vllm_logps": [0.0] * completion_len,
            "advantage": float(torch.randn((), generator=g)),
        })
    return samples


def peak_memory_gib(on_gpu: bool) -> float:
    """GPU: the most memory PyTorch's allocator held for tensors since the last reset. CPU: the
    process's peak resident set size (ru_maxrss is in KiB on Linux)."""
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(args: Args) -> dict:
    """Build the model and samples, run `warmup` + `steps` updates through train_grpo.train_on_batch,
    return the measurements (and the trained model, unwrapped, under "model")."""
    from accelerate import Accelerator

    if args.steps < 1 or args.warmup < 0 or args.num_samples < 1 or args.micro_batch_size < 1:
        raise ValueError("need steps >= 1, warmup >= 0, num_samples >= 1 and micro_batch_size >= 1")
    on_gpu = torch.cuda.is_available() and not args.cpu
    # The training script's bf16 path: accelerate wraps the forward in autocast (configs/*.yaml).
    accelerator = Accelerator(mixed_precision="bf16") if on_gpu else Accelerator(cpu=True)
    image_size = args.image_size or PRESETS[args.preset]["image_size"]
    train_args = T.Args(micro_batch_size=args.micro_batch_size, max_grad_norm=1.0,
                        gradient_checkpointing=args.gradient_checkpointing, vision_once=args.vision_once)
    samples = synthetic_samples(args.preset, args.num_samples, args.seq_len, args.completion_len, image_size,
                                args.seed, args.group_size)
    model = build_model(args.preset, args.seed, str(accelerator.device))
    num_params = sum(p.numel() for p in model.parameters())  # tied lm_head/embedding counted once
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    # As build_policy, without the warm-up schedule (it changes the lr, not the work).
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_args.learning_rate,
                                  weight_decay=train_args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    preset = PRESETS[args.preset]
    ids = preset["ids"]  # the vision special tokens, left out of the softmax as train_grpo.vision_token_ids
    banned = [ids["vision_start_token_id"], ids["vision_end_token_id"], preset["vision_pad_id"],
              ids["image_token_id"], ids["video_token_id"]]

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        T.train_on_batch(model, None, optimizer, scheduler, accelerator, samples, train_args, preset["pad_id"], banned)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        stats = T.train_on_batch(model, None, optimizer, scheduler, accelerator, samples, train_args,
                                 preset["pad_id"], banned)
    sync()
    seconds = time.perf_counter() - start

    tokens_per_update = args.num_samples * args.seq_len
    tokens_per_s = tokens_per_update * args.steps / seconds
    return {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "num_params": num_params,
        "tokens_per_update": tokens_per_update,
        "image_tokens_per_seq": sum(samples[0]["mm_token_type_ids"]),
        "seconds_per_update": seconds / args.steps,
        "tokens_per_s": tokens_per_s,
        "mfu": 6 * num_params * tokens_per_s / (args.peak_tflops * 1e12) if on_gpu else None,
        "peak_memory_gib": peak_memory_gib(on_gpu),
        "loss": stats["loss"],
        "grad_norm": stats["grad_norm"],
        "model": accelerator.unwrap_model(model),
    }


def report(result: dict, args: Args) -> str:
    """The printed lines; the last one is `tokens/s X, MFU Y%, peak memory Z GiB`."""
    mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    memory = "max_memory_allocated" if result["mfu"] is not None else "process peak RSS"
    return "\n".join([
        f"model            Qwen2.5-VL preset {args.preset!r}, {result['num_params']:,} parameters, random init",
        f"device           {result['device']}",
        (f"update           {args.num_samples} x {args.seq_len} tokens ({result['image_tokens_per_seq']} image, "
         f"{args.completion_len} completion), micro-batch {args.micro_batch_size}, "
         f"gradient checkpointing {args.gradient_checkpointing}, group {args.group_size}, "
         f"vision_once {args.vision_once}"),
        f"seconds/update   {result['seconds_per_update']:.3f}  (mean of {args.steps} after {args.warmup} warm-up)",
        f"tokens/s         {result['tokens_per_s']:,.0f}",
        f"MFU              {mfu}  (6 * N * tokens/s / {args.peak_tflops:g} TFLOP/s)",
        f"peak memory      {result['peak_memory_gib']:.2f} GiB ({memory})",
        f"tokens/s {result['tokens_per_s']:,.0f}, MFU {mfu}, peak memory {result['peak_memory_gib']:.2f} GiB",
    ])


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    print(report(run(cli_args), cli_args))
