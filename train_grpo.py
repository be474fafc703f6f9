"""GRPO from scratch for Qwen2.5-VL with vLLM rollouts and the four Perception-R1 rewards.

What this file does
    Trains a vision-language policy with Group Relative Policy Optimization. For each prompt
    (an image + a geometry question) vLLM samples G responses; each response gets

        R = w_acc * r_acc  +  w_fmt * r_fmt  +  w_vis * r_v  +  r_p          (0.9 / 0.1 / 0.7)

    where r_acc is answer correctness (math-verify), r_fmt the <think>/<answer> format,
    r_v the *visual perception reward* (share of the problem's visual facts that a judging LLM
    finds stated in the response, judge.py) and r_p a repetition penalty. Rewards are turned
    into group-normalised advantages and the policy takes a clipped-surrogate step; the new
    weights are then pushed into vLLM for the next rollouts.

Papers
    Perception-R1: Advancing Multimodal Reasoning Capabilities of MLLMs via Visual Perception
        Reward, arXiv:2506.07218 (the method; defaults follow its official training script)
    DeepSeekMath (GRPO), arXiv:2402.03300; DAPO (clip-higher), arXiv:2503.14476;
    dual-clip PPO, arXiv:1912.09729; k3 KL estimator, J. Schulman, "Approximating KL divergence"

Code map (section -> equation -> function)
    1. Args                      every hyperparameter, paper defaults            Args
    2. Rewards                   r_fmt, r_acc, r_p; R = sum w_i r_i             format_reward, accuracy_reward,
                                                                                 repetition_penalty, mix_rewards
    3. Advantages                A_i = (R_i - mean_G R) / (std_G R + eps)        group_advantages
    4. Token log-probs           log pi(y_t | x, y_<t), entropy                  token_logps
    5. Policy loss               clipped surrogate, eps_low/high, dual clip c    policy_loss
    6. KL to reference           k3 = exp(ref - logp) - (ref - logp) - 1         k3_kl
    7. Data                      rows -> prompts + resized images               load_train_rows, ...
    8. Rollouts                  vLLM generates G responses per prompt           generate_rollouts
    9. Training step             micro-batches, grad accumulation, AdamW         train_on_batch
   10. Weight sync, checkpoints, logging                                         sync_weights_to_vllm, ...
   11. main                      the loop

Deviations from the paper / official code
    1. A failed judge request is counted, logged (judge/failure_rate) and *imputed with the mean
       r_v of the response's group*, which leaves that response's advantage unaffected by r_v;
       the judge's run-level guard stops training when failures persist. The official code
       silently scores a failed request as r_v = 0.
    2. "token-mean" divides the summed token losses by the number of response tokens of the
       whole rollout batch on this process, not of each micro-batch, so that gradient
       accumulation (1 x k vs k x 1) gives the same gradient. With one micro-batch per rollout
       batch the two are identical.
    3. The instruction appended to each problem is our wording (data.INSTRUCTION) of the
       official prompt's requirements; its format requirements are identical.
    4. Images are resized once to the Qwen2.5-VL grid (data.resize_image) before both the HF
       processor and vLLM see them, so both produce the same image tokens.

Shapes: B = prompts, G = responses per prompt, T = tokens, V = vocabulary.

Launch
    CPU demo (tiny model, demo data):  make demo
    1 GPU:   accelerate launch --config_file configs/single_gpu.yaml train_grpo.py --dataset PATH
    8 GPUs:  accelerate launch --config_file configs/deepspeed_zero3.yaml train_grpo.py \\
                 --dataset PATH --judge.backend openai --judge.base_urls http://JUDGE:8000/v1
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

import data
from judge import JudgeArgs, build_judge, split_annotations


# =============================================================================================
# 1. Args
# =============================================================================================
@dataclasses.dataclass
class Args:
    # --- model and data ---
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """policy checkpoint: hub id or local folder (paper: Qwen2.5-VL-7B-Instruct)"""
    dataset: str = "demo_data/train.jsonl"
    """training rows: local .jsonl/.parquet or a Hugging Face dataset id, training schema
    (problem with <image>, answer, images, visual_key_info). Paper: the authors' 1,442 annotated
    Geometry3K problems (annotate.py builds such a file)."""
    split: str = "train"
    """split to read when `dataset` is a Hugging Face id"""
    min_pixels: int = data.PAPER_MIN_PIXELS
    """smallest image size in pixels after resizing (official script: 3,136)"""
    max_pixels: int = data.PAPER_MAX_PIXELS
    """largest image size in pixels after resizing (official script: 1,806,336)"""
    max_prompt_length: int = 4096
    """tokens; prompts longer than this fail loudly (never truncated: they hold image tokens). Official: 4,096"""
    max_response_length: int = 4096
    """tokens generated per response at most (official: 4,096)"""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """vLLM rollout dtype (paper: bf16; CPU runs use float32). The policy itself keeps float32
    master weights; its bf16 compute comes from accelerate's mixed_precision (configs/)"""

    # --- GRPO ---
    group_size: int = 8
    """G, responses per prompt (official: 8)"""
    prompts_per_step: int = 128
    """B, prompts per rollout batch, all processes together (official: 128 -> 1,024 responses)"""
    epochs: int = 25
    """passes over the dataset (official: 25 -> about 275 steps on 1,442 problems)"""
    max_steps: int | None = None
    """stop after this many rollout steps, each = ppo_epochs optimizer steps (None: epochs * steps per epoch)"""
    temperature: float = 1.0
    """sampling temperature for rollouts (official: 1.0)"""
    top_p: float = 1.0
    """nucleus sampling for rollouts (official: 1.0)"""
    ppo_epochs: int = 1
    """policy updates per rollout batch (official: 1, fully on-policy)"""
    clip_eps_low: float = 0.2
    """lower clip range: ratio >= 1 - eps_low (official: 0.2)"""
    clip_eps_high: float = 0.3
    """upper clip range: ratio <= 1 + eps_high (official: 0.3, "clip-higher")"""
    dual_clip: float = 3.0
    """dual-clip constant c for negative advantages (official: 3.0)"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """loss aggregation: mean over all response tokens (official) or mean over responses of
    each response's token mean"""
    adv_eps: float = 1e-6
    """eps in (r - mean) / (std + eps) (official: 1e-6)"""
    kl_coef: float = 0.0
    """beta for the k3 KL penalty to a frozen reference (official: 0 = off, no reference loaded;
    EasyR1's generic config uses 1e-2 when on)"""

    # --- rewards ---
    w_acc: float = 0.9
    """weight of r_acc (official: 0.9)"""
    w_fmt: float = 0.1
    """weight of r_fmt (official: 0.1)"""
    w_vis: float = 0.7
    """weight of r_v, the visual perception reward (official: 0.7; paper: 0.1..0.9 all similar)"""
    rep_ngram: int = 20
    """n of the n-grams in the repetition penalty (official: 20)"""
    rep_max_penalty: float = -2.0
    """repetition penalty at full repetition (official: -2.0)"""
    judge: JudgeArgs = dataclasses.field(default_factory=JudgeArgs)
    """the judging LLM for r_v (see judge.py)"""

    # --- optimisation ---
    learning_rate: float = 1e-6
    """AdamW learning rate (official: 1e-6)"""
    weight_decay: float = 1e-3
    """AdamW weight decay (official: 1e-3)"""
    warmup_ratio: float = 0.05
    """share of steps with linear warm-up, then constant (official: 0.05)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (official: 1.0)"""
    micro_batch_size: int = 4
    """responses per forward/backward pass per process (memory knob; does not change the maths)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""

    # --- vLLM ---
    gpu_memory_utilization: float = 0.4
    """share of GPU memory vLLM may take in each training process"""
    tensor_parallel_size: int = 1
    """vLLM tensor parallel size inside each process"""
    vllm_sleep: bool = False
    """put vLLM to sleep during the update phase to free its memory (GPU only)"""
    enforce_eager: bool = False
    """disable CUDA graphs in vLLM (always on for CPU)"""

    # --- bookkeeping ---
    seed: int = 1
    """random seed (data order, sampling; each process adds its rank)"""
    output_dir: str = "runs/perception-r1"
    """where logs and checkpoints go"""
    log_every: int = 1
    """print/log metrics every N steps"""
    sample_every: int = 10
    """log a table of sample completions with their reward terms every N steps"""
    save_every: int = 50
    """checkpoint every N steps (and at the end); 0 = only at the end"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir"""
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """metrics sink besides stdout and metrics.jsonl (wandb is opt-in)"""


# =============================================================================================
# 2. Rewards (pure functions; defaults reproduce the official definitions)
# =============================================================================================
# Full match, DOTALL: "<think>\n...\n</think>\n<answer>\n...\boxed{non-empty}...\n</answer>".
FORMAT_PATTERN = re.compile(r"<think>\n.*\n</think>\n<answer>\n.*\\boxed\{.+\}.*\n</answer>", re.DOTALL)
# The official extraction regex has no DOTALL, so it only matches a one-line <answer> block;
# a well-formatted (multi-line) response is therefore parsed whole and math-verify picks its
# \boxed value. We keep that behaviour by default (answer_dotall=False).
ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>")
ANSWER_PATTERN_DOTALL = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward(response: str) -> float:
    """r_fmt in {0, 1}: 1 iff the whole response matches the think/answer layout with a
    non-empty \\boxed{} inside <answer>.

    >>> format_reward("<think>\\nx\\n</think>\\n<answer>\\n\\\\boxed{3}\\n</answer>")
    1.0
    """
    return 1.0 if FORMAT_PATTERN.fullmatch(response) else 0.0


def accuracy_reward(response: str, answer: str, answer_dotall: bool = False, timeout_s: int = 5) -> float:
    """r_acc in {0, 1}: math-verify `verify(parse(gold), parse(given))` (gold first).

    `given` is the <answer> block when the official regex finds one, else the whole response.
    Any exception counts 0. math-verify's timeouts rely on signals, which only work in a
    process's main thread: call this from the main thread (train_grpo does; the judge runs in a
    worker thread) or pass timeout_s=None off it.
    """
    from math_verify import parse, verify

    match = (ANSWER_PATTERN_DOTALL if answer_dotall else ANSWER_PATTERN).search(response)
    given = match.group(1).strip() if match else response.strip()
    try:
        gold = parse(answer, parsing_timeout=timeout_s)
        pred = parse(given, parsing_timeout=timeout_s)
        return 1.0 if verify(gold, pred, timeout_seconds=timeout_s) else 0.0
    except Exception:  # official behaviour: unparsable or timed out -> 0
        return 0.0


def repetition_penalty(response: str, n: int = 20, max_penalty: float = -2.0) -> float:
    """r_p in [max_penalty, 0]: max_penalty * (1 - |distinct n-grams| / |n-grams|) over
    lower-cased whitespace words; 0 for responses with fewer than n words.

    >>> repetition_penalty("a b " * 20, n=2)   # 39 bigrams, 2 distinct
    -1.8974358974358974
    """
    words = response.lower().split()
    if len(words) < n:
        return 0.0
    ngrams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return max_penalty * (1.0 - len(set(ngrams)) / len(ngrams))


def mix_rewards(r_acc: torch.Tensor, r_fmt: torch.Tensor, r_vis: torch.Tensor, r_rep: torch.Tensor,
                w_acc: float, w_fmt: float, w_vis: float) -> torch.Tensor:
    """R = w_acc r_acc + w_fmt r_fmt + w_vis r_v + r_p, all shape (B*G,)."""
    return w_acc * r_acc + w_fmt * r_fmt + w_vis * r_vis + r_rep


def impute_failed_judgements(r_vis: list[float | None], group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace judge failures (None) by the mean r_v of the usable responses in the same group
    (0 if none is usable): the failed response then gets no advantage from r_v, up or down.

    Returns (r_v (B*G,), failed mask (B*G,) bool).
    """
    failed = torch.tensor([v is None for v in r_vis])
    values = torch.tensor([0.0 if v is None else float(v) for v in r_vis]).view(-1, group_size)
    ok = ~failed.view(-1, group_size)
    group_mean = (values * ok).sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1)
    values = torch.where(ok, values, group_mean.expand_as(values))
    return values.view(-1), failed


# =============================================================================================
# 3. Group-relative advantages
# =============================================================================================
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i - mean_g R) / (std_g R + eps) within each group of `group_size` contiguous
    responses; std is the unbiased sample standard deviation (as in the official code).

    rewards: (B*G,) -> advantages: (B*G,). A group with equal rewards gets all-zero advantages.
    """
    r = rewards.view(-1, group_size)  # (B, G)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((r - mean) / (std + eps)).view(-1)


# =============================================================================================
# 4. Token log-probs without a full (B, T, V) log-softmax
# =============================================================================================
def token_logps(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False):
    """log softmax(logits)[target] per position, computed one sequence at a time so that at most
    one (T, V) float32 log-softmax exists at once (V is 152k for Qwen2.5-VL).

    logits: (N, T, V), targets: (N, T) -> logps (N, T) [, entropy (N, T), no gradient]
    """
    logps, entropy = [], []
    for row_logits, row_targets in zip(logits, targets):  # loop over N: memory, not speed
        row_logp = row_logits.float().log_softmax(dim=-1)  # (T, V)
        logps.append(row_logp.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            with torch.no_grad():
                entropy.append(-(row_logp.exp() * row_logp).sum(-1))
    logps = torch.stack(logps)
    return (logps, torch.stack(entropy)) if with_entropy else logps


# =============================================================================================
# 5. Clipped surrogate with clip-higher and dual clip
# =============================================================================================
def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.3,
                dual_clip: float = 3.0, loss_agg: str = "token-mean", num_tokens: float | None = None):
    """PPO-clip loss per token, aggregated.

        ratio   = exp(logp - old_logp)
        l_clip  = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))
        l       = min(l_clip, -A c)  where A < 0   (dual clip bounds the loss of very
                  unlikely-now actions with negative advantage)
    logps/old_logps/mask: (N, T); advantages: (N,) broadcast over tokens.
    token-mean: sum(l * mask) / num_tokens (num_tokens defaults to mask.sum());
    seq-mean-token-mean: mean over sequences of each sequence's token mean.
    Returns (loss, stats dict of detached tensors).
    """
    adv = advantages.unsqueeze(-1)  # (N, 1)
    ratio = torch.exp(logps - old_logps)  # (N, T)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_clip = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = torch.minimum(loss_clip, -adv * dual_clip)
    per_token = torch.where(adv < 0, loss_dual, loss_clip)  # (N, T)
    mask = mask.to(per_token.dtype)
    if loss_agg == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        loss = (per_token * mask).sum() / max(float(denom), 1.0)
    elif loss_agg == "seq-mean-token-mean":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {
            "clip_frac": (((loss_clipped > loss_unclipped) & (mask > 0)).float().sum() / n),
            "dual_clip_frac": (((adv < 0) & (loss_clip > -adv * dual_clip) & (mask > 0)).float().sum() / n),
            "ratio_mean": (ratio * mask).sum() / n,
        }
    return loss, stats


# =============================================================================================
# 6. KL to the reference policy (k3 estimator, only when kl_coef > 0)
# =============================================================================================
def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, an unbiased, low-variance
    estimate of KL(pi || ref) from samples of pi. Log-ratio clamped to +-20 and the value to
    [-10, 10] as in EasyR1's "low_var_kl". Shapes (N, T) -> (N, T)."""
    log_ratio = (ref_logps - logps).clamp(-20.0, 20.0)
    return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)


# =============================================================================================
# 7. Data
# =============================================================================================
def load_train_rows(args: Args) -> list[dict]:
    """Load and validate every row up front: a bad row stops the run before any GPU time is
    spent, with an error naming the row and field."""
    rows = data.load_rows(args.dataset, args.split)
    if not rows:
        raise ValueError(f"{args.dataset}: no rows")
    for row in rows:
        data.check_row(row, require_facts=args.w_vis != 0)
    return rows


def batch_indices(num_rows: int, step: int, prompts_per_step: int, seed: int) -> list[int]:
    """Global row indices of the prompts of `step`: a fresh permutation per epoch, drop_last
    (official). A pure function of (step, seed), so resuming at step s replays the same data."""
    steps_per_epoch = num_rows // prompts_per_step
    epoch, pos = divmod(step, steps_per_epoch)
    order = list(range(num_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[pos * prompts_per_step:(pos + 1) * prompts_per_step]


# =============================================================================================
# 8. Rollouts with vLLM
# =============================================================================================
def build_vllm(args: Args, rank: int, num_processes: int, max_images: int):
    """One vLLM engine per training process (colocated), same pixel bounds as the HF processor."""
    from vllm import LLM

    on_cpu = not torch.cuda.is_available()
    kwargs = {}
    if on_cpu:
        # Seeded requests whose prefill gets split into chunks make vLLM rewind the sampler's
        # random generator, which CPU generators cannot do: give prefill room for every prompt.
        kwargs["max_num_batched_tokens"] = 64 * (args.max_prompt_length + args.max_response_length)
    if num_processes > 1 and not on_cpu:
        # each rank runs its own engine inside the torch.distributed world accelerate set up
        kwargs["distributed_executor_backend"] = "external_launcher"
    return LLM(
        model=args.model,
        dtype="float32" if on_cpu else args.dtype,
        enforce_eager=args.enforce_eager or on_cpu,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_prompt_length + args.max_response_length,
        seed=args.seed + rank,
        limit_mm_per_prompt={"image": max_images},
        mm_processor_kwargs={"min_pixels": args.min_pixels, "max_pixels": args.max_pixels},
        enable_sleep_mode=args.vllm_sleep,
        **kwargs,
    )


def generate_rollouts(llm, prompts: list[str], images: list[list], args: Args, step: int, rank: int,
                      forbidden_ids: list[int]):
    """G samples per prompt. Returns completion token ids, list of B*G lists (groups contiguous).

    Each request gets multi_modal_uuids unique to this step: after a weight sync, vision-encoder
    outputs cached under an old key would be stale. Sampling seeds depend on (seed, step, rank,
    prompt) so that a resumed run regenerates exactly the samples an uninterrupted run saw.
    """
    from vllm import SamplingParams

    requests, params = [], []
    for i, (prompt, imgs) in enumerate(zip(prompts, images)):
        requests.append({"prompt": prompt, "multi_modal_data": {"image": imgs},
                         "multi_modal_uuids": {"image": [f"s{step}-r{rank}-p{i}-i{k}" for k in range(len(imgs))]}})
        params.append(SamplingParams(
            n=args.group_size, temperature=args.temperature, top_p=args.top_p,
            max_tokens=args.max_response_length,
            # vLLM seeds sample g of a request with seed + g: space the prompts G apart
            seed=(args.seed * 1_000_003 + step * 100_003 + (rank * 10_007 + i) * args.group_size) % (2**31),
            logit_bias={t: -100.0 for t in forbidden_ids},  # never sample vision special tokens
        ))
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [list(o.token_ids) for out in outputs for o in out.outputs]


# =============================================================================================
# 9. Training step: micro-batches, gradient accumulation, one or more updates
# =============================================================================================
def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad prompt+completion ids of a micro-batch; concatenate image patches in order."""
    lengths = [len(s["prompt_ids"]) + len(s["completion_ids"]) for s in samples]
    T_max = max(lengths)
    C_max = max(len(s["completion_ids"]) for s in samples)
    input_ids = torch.full((len(samples), T_max), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), T_max), dtype=torch.long)
    completion_ids = torch.full((len(samples), C_max), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(samples), C_max), dtype=torch.float32)
    positions = torch.zeros((len(samples), C_max), dtype=torch.long)  # index of logit predicting token
    for i, s in enumerate(samples):
        ids = s["prompt_ids"] + s["completion_ids"]
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        c = len(s["completion_ids"])
        completion_ids[i, :c] = torch.tensor(s["completion_ids"])
        completion_mask[i, :c] = 1.0
        positions[i, :c] = torch.arange(len(s["prompt_ids"]) - 1, len(ids) - 1)
    return {
        "input_ids": input_ids, "attention_mask": attention_mask,
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples]),
        "completion_ids": completion_ids, "completion_mask": completion_mask, "positions": positions,
    }


def forward_logps(model, mb: dict, with_entropy: bool = False):
    """Token log-probs of the completion tokens of a collated micro-batch: (N, C).

    The model is asked only for the logits of the last `keep` positions (`logits_to_keep`),
    those that predict completion tokens: for a 7B model with V = 152k, full (N, T, V) logits
    of 8k-token sequences would take ~10 GB per micro-batch of 4.
    """
    T = mb["input_ids"].shape[1]
    first = int(mb["positions"][mb["completion_mask"] > 0].min()) if mb["completion_mask"].any() else T - 1
    keep = T - first
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"], use_cache=False,
                logits_to_keep=keep)
    logits = out.logits  # (N, keep, V), position p of the sequence is row p - first
    rows = (mb["positions"] - first).clamp(min=0)  # (N, C)
    logps, entropy = [], []
    for i in range(logits.shape[0]):  # one (C, V) slice at a time, never a second (N, C, V) copy
        lp = token_logps(logits[i].index_select(0, rows[i]).unsqueeze(0), mb["completion_ids"][i:i + 1],
                         with_entropy)
        logps.append(lp[0] if with_entropy else lp)
        if with_entropy:
            entropy.append(lp[1])
    return (torch.cat(logps), torch.cat(entropy)) if with_entropy else torch.cat(logps)


def train_on_batch(model, ref_model, optimizer, scheduler, accelerator, samples: list[dict],
                   args: Args, pad_id: int) -> dict:
    """One rollout batch: optional old/ref log-prob passes, then `ppo_epochs` optimizer steps,
    each accumulating gradients over micro-batches. Returns averaged stats."""
    device = accelerator.device
    micro = [samples[i:i + args.micro_batch_size] for i in range(0, len(samples), args.micro_batch_size)]
    micro = [{k: v.to(device) for k, v in collate(mb, pad_id).items()} for mb in micro]  # PLUMBING
    num_tokens = sum(float(mb["completion_mask"].sum()) for mb in micro)
    adv = torch.tensor([s["advantage"] for s in samples], device=device)

    # ALGO: old log-probs are needed only when the policy moves between updates (ppo_epochs > 1);
    # with one update the ratio is exactly 1 and old_logps = logps.detach() costs nothing.
    if args.ppo_epochs > 1:
        with torch.no_grad():
            for mb in micro:
                mb["old_logps"] = forward_logps(model, mb)
    if ref_model is not None:  # ALGO: reference log-probs only when KL is on
        with torch.no_grad():
            for mb in micro:
                mb["ref_logps"] = forward_logps(ref_model, mb)

    stats: dict[str, list[float]] = {}
    start = 0
    for mb in micro:
        mb["advantages"] = adv[start:start + mb["input_ids"].shape[0]]
        start += mb["input_ids"].shape[0]
    for _ in range(args.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        for k, mb in enumerate(micro):
            last = k == len(micro) - 1
            # PLUMBING: gradients are synchronised (DDP all-reduce; DeepSpeed's engine step) only
            # after the last micro-batch. accelerate reads this flag in backward(); without an
            # `accumulate()` context it would be True for every micro-batch and DeepSpeed would
            # step the optimizer after each one.
            accelerator.gradient_state._set_sync_gradients(last)
            sync = accelerator.no_sync(model) if not last else _nullcontext()
            with sync:
                logps, entropy = forward_logps(model, mb, with_entropy=True)  # (N, C)
                old = mb.get("old_logps", logps.detach())
                # ALGO: token-mean over the whole local batch (see deviation 2); seq-mean divides
                # by the number of micro-batches so the sum over them is a mean.
                loss, pstats = policy_loss(
                    logps, old, mb["advantages"], mb["completion_mask"], args.clip_eps_low,
                    args.clip_eps_high, args.dual_clip, args.loss_agg, num_tokens=num_tokens)
                if args.loss_agg == "seq-mean-token-mean":
                    loss = loss * mb["input_ids"].shape[0] / len(samples)
                kl = torch.zeros((), device=device)
                if ref_model is not None:
                    kl_tok = k3_kl(logps, mb["ref_logps"])
                    kl = (kl_tok * mb["completion_mask"]).sum() / num_tokens
                    loss = loss + args.kl_coef * kl
                # PLUMBING: DeepSpeed divides the loss by its configured accumulation steps;
                # our loss is already normalised over the whole batch, so undo that.
                accelerator.backward(loss * _deepspeed_gas(accelerator))
            m = mb["completion_mask"]
            for key, val in {**pstats, "entropy": (entropy * m).sum() / m.sum().clamp(min=1),
                             "kl": kl * num_tokens / m.sum().clamp(min=1), "loss": loss}.items():
                stats.setdefault(key, []).append(float(val.detach()))
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        stats.setdefault("grad_norm", []).append(float(grad_norm))
    # "loss" holds one entry per micro-batch and update: the batch loss is their sum per update,
    # averaged over the ppo_epochs updates.
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    out["loss"] = float(np.sum(stats["loss"])) / args.ppo_epochs
    return out


def _deepspeed_gas(accelerator) -> int:
    if getattr(accelerator, "deepspeed_engine_wrapped", None) is None:
        return 1
    return int(accelerator.deepspeed_engine_wrapped.engine.gradient_accumulation_steps())


def fail_together(accelerator, error: BaseException | None) -> None:
    """Raise on every process if any process hit `error`: a rank that raised alone would leave
    the others blocked in the next collective until the NCCL timeout."""
    if accelerator.num_processes > 1:
        flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
        flag = accelerator.reduce(flag, reduction="sum")  # number of failed processes
        if error is None and flag.item() > 0:
            raise RuntimeError(f"stopping: {int(flag.item())} other process(es) failed; see their error above")
    if error is not None:
        raise error


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# =============================================================================================
# 10. Weight sync, checkpoints, logging (plumbing)
# =============================================================================================
def sync_weights_to_vllm(accelerator, model, llm) -> None:
    """Push the policy's current weights into the colocated vLLM engine.

    `reload_weights` takes Hugging Face parameter names and handles vLLM's weight repacking
    (plain `load_weights` breaks on CPU). Under DeepSpeed ZeRO-3 parameters are sharded, so
    each one is gathered before it is sent. Prefix and multimodal caches are reset: they hold
    activations computed with the old weights.
    """
    unwrapped = accelerator.unwrap_model(model)
    if getattr(accelerator.state, "deepspeed_plugin", None) and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        def named():
            for name, p in unwrapped.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    yield name, p.data.detach().clone()
        weights = named()
    else:
        weights = ((name, p.detach()) for name, p in unwrapped.state_dict().items())
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()
    llm.reset_mm_cache()


def save_checkpoint(accelerator, model, processor, out: Path, step: int, data_state: dict) -> Path:
    """checkpoint-<step>/ = policy/ (HF format, loadable by vLLM and evaluate.py) + accelerate
    state (optimizer, scheduler, RNG per rank) + state.json. Written to a temp folder, then
    renamed, so a kill never leaves a half-written checkpoint that --resume would pick."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(tmp / "policy", state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(tmp / "policy")
        (tmp / "state.json").write_text(json.dumps({"step": step, **data_state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


class Logger:
    """stdout + metrics.jsonl (+ TensorBoard or wandb), main process only."""

    def __init__(self, args: Args, accelerator, run_config: dict):
        self.main = accelerator.is_main_process
        self.tb = self.wandb = None
        if not self.main:
            return
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")
        if args.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
            self.tb.add_text("config", "```\n" + json.dumps(run_config, indent=2, default=str) + "\n```")
        elif args.report_to == "wandb":
            import wandb

            self.wandb = wandb.init(project="perception-r1", config=run_config, dir=str(out))
        print(json.dumps({"config": run_config}, default=str), flush=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        keys = ["reward/total", "reward/accuracy", "reward/format", "reward/visual", "reward/repetition",
                "train/loss", "train/entropy", "perf/step_s"]
        print(f"step {step:>5} " + " ".join(f"{k.split('/')[1]}={metrics[k]:.3f}" for k in keys if k in metrics),
              flush=True)

    def samples(self, step: int, rows: list[dict]) -> None:
        if not self.main:
            return
        table = "| reward | acc | fmt | vis | rep | response |\n|---|---|---|---|---|---|\n" + "\n".join(
            f"| {r['reward']:.2f} | {r['acc']:.0f} | {r['fmt']:.0f} | {r['vis']:.2f} | {r['rep']:.2f} | "
            f"{r['response'][:300]!r} |" for r in rows)
        if self.tb:
            self.tb.add_text("samples", table, step)
        if self.wandb:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])}, step=step)
        print(f"--- samples at step {step}\n{table}", flush=True)


def run_config(args: Args) -> dict:
    """Hyperparameters, git sha and library versions; the judge API key is never included
    (JudgeArgs holds only the *name* of the environment variable)."""
    import subprocess

    import transformers

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = "unknown"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import vllm

        versions["vllm"] = vllm.__version__
    except ImportError:
        pass
    return {"args": dataclasses.asdict(args), "git_sha": sha, "versions": versions}


# =============================================================================================
# 11. main
# =============================================================================================
def main(args: Args) -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForImageTextToText, AutoProcessor, get_constant_schedule_with_warmup

    # step_scheduler_with_optimizer=False: accelerate would otherwise step the LR schedule once
    # per process on every call (8x too fast on 8 GPUs).
    accelerator = Accelerator(step_scheduler_with_optimizer=False)
    rank, world = accelerator.process_index, accelerator.num_processes

    # --- derived sizes, checked loudly -------------------------------------------------------
    rows = load_train_rows(args)
    if args.prompts_per_step % world:
        raise ValueError(f"prompts_per_step={args.prompts_per_step} must be divisible by the number "
                         f"of processes ({world})")
    if args.tensor_parallel_size > 1 and world > 1:
        raise ValueError("tensor_parallel_size > 1 with several training processes is not supported: every "
                         "rank of a vLLM tensor-parallel group would need identical requests")
    local_prompts = args.prompts_per_step // world  # prompts each process rolls out
    steps_per_epoch = len(rows) // args.prompts_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"dataset has {len(rows)} rows, fewer than prompts_per_step={args.prompts_per_step}")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    max_images = max(len(r["images"]) for r in rows)
    set_seed(args.seed + rank)  # PLUMBING: per-rank seed offset

    # --- models --------------------------------------------------------------------------------
    # The policy keeps float32 master weights: an AdamW update at lr 1e-6 is far below bf16's
    # resolution and would round away. bf16 compute comes from accelerate's mixed_precision
    # (configs/*.yaml); `--dtype` is the rollout engine's dtype.
    dtype = torch.float32
    processor = AutoProcessor.from_pretrained(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    tokenizer = processor.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ref_model = None
    if args.kl_coef > 0:  # no reference model at all when KL is off (official default)
        ref_model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).eval()
        ref_model.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_constant_schedule_with_warmup(  # counted in optimizer steps
        optimizer, math.ceil(args.warmup_ratio * total_steps * args.ppo_epochs))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if ref_model is not None:
        ref_model = ref_model.to(accelerator.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    forbidden_ids = [i for t in ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                 "<|video_pad|>") if (i := tokenizer.convert_tokens_to_ids(t)) is not None
                     and i != tokenizer.unk_token_id]

    # --- resume ---------------------------------------------------------------------------------
    out = Path(args.output_dir)
    start_step = 0
    if args.resume and (ckpt := latest_checkpoint(out)) is not None:
        accelerator.load_state(str(ckpt / "accelerate"))
        start_step = json.loads((ckpt / "state.json").read_text())["step"]
        accelerator.print(f"resumed from {ckpt} at step {start_step}")

    # --- judge first (fail fast, naming the URL, before the engine starts), then vLLM ---------------
    judge = build_judge(args.judge) if args.w_vis != 0 else None
    if judge is not None:
        judge.health_check()
    llm = build_vllm(args, rank, world, max_images)
    if start_step > 0:
        sync_weights_to_vllm(accelerator, model, llm)
    judge_pool = ThreadPoolExecutor(max_workers=1)
    logger = Logger(args, accelerator, run_config(args))

    for step in range(start_step, total_steps):
        t0 = time.time()
        # 1) this process's prompts ------------------------------------------------------------
        idx = batch_indices(len(rows), step, args.prompts_per_step, args.seed)
        local_rows = [rows[i] for i in idx[rank * local_prompts:(rank + 1) * local_prompts]]
        local_images = [data.row_images(r, args.min_pixels, args.max_pixels) for r in local_rows]
        prompts = [data.build_prompt(processor, r["problem"], len(im)) for r, im in zip(local_rows, local_images)]

        # 2) rollouts: G responses per prompt, groups contiguous ---------------------------------
        completion_ids = generate_rollouts(llm, prompts, local_images, args, step, rank, forbidden_ids)
        if args.vllm_sleep:
            llm.sleep(level=2)  # PLUMBING: drop KV cache and weights (the sync rewrites them)
        responses = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        t_gen = time.time() - t0

        # 3) rewards: judge requests in a worker thread while the cheap rewards run here -----------
        G = args.group_size
        facts = [r["visual_key_info"] if args.w_vis != 0 else "" for r in local_rows for _ in range(G)]
        judge_future = judge_pool.submit(judge.score, facts, responses) if judge is not None else None
        r_acc = torch.tensor([accuracy_reward(resp, str(local_rows[i // G]["answer"])) for i, resp in enumerate(responses)])
        r_fmt = torch.tensor([format_reward(resp) for resp in responses])
        r_rep = torch.tensor([repetition_penalty(resp, args.rep_ngram, args.rep_max_penalty) for resp in responses])
        if judge_future is not None:
            judged, error = None, None
            try:
                judged = judge_future.result()
            except Exception as e:  # JudgeError from the failure guard, or the client itself
                error = e
            fail_together(accelerator, error)  # PLUMBING: every rank stops, none hangs
            r_vis, judge_failed = impute_failed_judgements(judged, G)
        else:
            r_vis, judge_failed = torch.zeros(len(responses)), torch.zeros(len(responses), dtype=torch.bool)
        has_facts = torch.tensor([len(split_annotations(f)) > 0 for f in facts])
        rewards = mix_rewards(r_acc, r_fmt, r_vis, r_rep, args.w_acc, args.w_fmt, args.w_vis)  # ALGO (B*G,)
        advantages = group_advantages(rewards, G, args.adv_eps)  # ALGO (B*G,)
        t_reward = time.time() - t0 - t_gen

        # 4) training samples: processor prompt ids + vLLM completion ids --------------------------
        samples, error = [], None
        for p, (prompt, imgs) in enumerate(zip(prompts, local_images)):
            enc = processor(text=[prompt], images=imgs, return_tensors="pt")
            prompt_ids = enc["input_ids"][0].tolist()
            if len(prompt_ids) > args.max_prompt_length:
                error = ValueError(f"{data.row_name(local_rows[p])}: prompt has {len(prompt_ids)} tokens, more "
                                   f"than max_prompt_length={args.max_prompt_length} (prompts with image tokens "
                                   "are never truncated; lower max_pixels or raise the limit)")
                break
            for g in range(G):
                i = p * G + g
                samples.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids[i] or [tokenizer.eos_token_id],
                                "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"],
                                "advantage": float(advantages[i])})

        fail_together(accelerator, error)  # PLUMBING

        # 5) policy update -------------------------------------------------------------------------
        model.train()
        train_stats = train_on_batch(model, ref_model, optimizer, scheduler, accelerator, samples, args, pad_id)
        t_train = time.time() - t0 - t_gen - t_reward

        # 6) new weights into vLLM -------------------------------------------------------------------
        if args.vllm_sleep:
            llm.wake_up()  # PLUMBING: weights back on the GPU before they are overwritten
        sync_weights_to_vllm(accelerator, model, llm)  # PLUMBING

        # 7) logging: every metric is averaged over processes (accelerator.reduce, mean) -------------
        lengths = torch.tensor([float(len(c)) for c in completion_ids])
        zero_spread = (rewards.view(-1, G).std(1) < 1e-8).float() if G > 1 else torch.ones(len(local_rows))
        local = {
            "reward/total": rewards.mean(), "reward/accuracy": r_acc.mean(), "reward/format": r_fmt.mean(),
            "reward/visual": (r_vis[has_facts & ~judge_failed].mean() if (has_facts & ~judge_failed).any()
                              else torch.tensor(0.0)),
            "reward/repetition": r_rep.mean(),
            "adv/mean": advantages.mean(), "adv/std": advantages.std(), "adv/abs_max": advantages.abs().max(),
            "adv/zero_spread_groups": zero_spread.mean(),
            "judge/failed_responses": judge_failed.float().mean(),
            "completion/length_mean": lengths.mean(), "completion/length_max": lengths.max(),
            "completion/truncated": (lengths >= args.max_response_length).float().mean(),
            **{f"train/{k}": torch.tensor(v) for k, v in train_stats.items()},
            "train/lr": torch.tensor(scheduler.get_last_lr()[0]),
            "perf/generate_s": torch.tensor(t_gen), "perf/reward_s": torch.tensor(t_reward),
            "perf/train_s": torch.tensor(t_train), "perf/step_s": torch.tensor(time.time() - t0),
        }
        stacked = torch.stack([v.float() for v in local.values()]).to(accelerator.device)
        reduced = accelerator.reduce(stacked, reduction="mean")  # mean over processes
        metrics = {k: float(v) for k, v in zip(local, reduced)}
        if judge is not None:
            metrics.update({k: float(v) for k, v in judge.stats().items()})
        if (step + 1) % args.log_every == 0:
            logger.log(step + 1, metrics)
        if args.sample_every and (step + 1) % args.sample_every == 0:
            logger.samples(step + 1, [{"reward": float(rewards[i]), "acc": float(r_acc[i]), "fmt": float(r_fmt[i]),
                                       "vis": float(r_vis[i]), "rep": float(r_rep[i]), "response": responses[i]}
                                      for i in range(0, len(responses), max(1, G // 2))][:8])

        # 8) checkpoint ---------------------------------------------------------------------------------
        done = step + 1 == total_steps
        if done or (args.save_every and (step + 1) % args.save_every == 0):
            save_checkpoint(accelerator, model, processor, out, step + 1,
                            {"epoch": (step + 1) // steps_per_epoch, "rows": len(rows)})

    judge_pool.shutdown()
    if judge is not None:
        judge.close()
    accelerator.print(f"done: {total_steps} steps, checkpoints in {out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
