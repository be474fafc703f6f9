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
    DeepSeekMath (GRPO), arXiv:2402.03300; DAPO (clip-higher, token-mean), arXiv:2503.14476;
    dual-clip PPO, arXiv:1912.09729; k3 KL estimator, J. Schulman, "Approximating KL divergence";
    truncated importance sampling for rollout/trainer mismatch, F. Yao et al., "Your efficient RL
    framework secretly brings you off-policy RL training" (2025)

Code map (section -> equation -> function)
    1. Args                      every hyperparameter, paper defaults            Args
    2. Rewards                   r_fmt, r_acc, r_p; R = sum_i w_i r_i            format_reward, accuracy_reward,
                                                                                 repetition_penalty, reward_table,
                                                                                 mix_rewards
    3. Advantages                A_i = (R_i - mean_G R) / (std_G R + eps)        group_advantages
    4. Token log-probs           log pi(y_t | x, y_<t) at temperature tau        token_logps
    5. Policy loss               clipped surrogate, eps_low/high, dual clip c,   policy_loss, aggregate
                                 optional TIS weight min(pi_old / pi_vllm, C)
    6. KL and mismatch           k3 = exp(q - p) - (q - p) - 1                   k3_kl, tis_weights
    7. Data                      rows checked up front, prompts + images         load_checked_rows, batch_indices
    8. Rollouts                  vLLM generates G responses per prompt           generate_rollouts
    9. Training step             micro-batches, one global token-mean, AdamW     train_on_batch
                                 (--vision_once: one vision pass per prompt)     image_features_once
   10. Validation                greedy responses scored by the training rewards validate
   11. Weight sync, checkpoints, logging                                         sync_weights_to_vllm, ...
   12. main                      the loop

Deviations from the paper / official code
    1. A failed judge request is counted, logged (judge/failure_rate) and *imputed with the mean
       r_v of the response's group*, which leaves that response's advantage unaffected by r_v;
       the judge's run-level guard stops training when failures persist. In the official code a
       failed request returns None, which the next line dereferences: the whole run crashes.
    2. "token-mean" divides the summed token losses by the number of response tokens of the
       whole rollout batch over all processes (one all-reduce), not of each micro-batch, so that
       gradient accumulation (1 x k vs k x 1) and the number of processes leave the gradient
       unchanged. With one micro-batch on one process the two are identical.
    3. The instruction appended to each problem is our paraphrase (data.INSTRUCTION) with exactly
       the official prompt's requirements and nothing more; `--instruction @FILE` runs the authors'
       own text.
    4. Images are resized once to the Qwen2.5-VL grid (data.resize_image) before both the HF
       processor and vLLM see them, so both produce the same image tokens.
    5. Ours, off by default: truncated importance sampling (`--tis_cap`) against the
       rollout/trainer mismatch; the mismatch itself is always measured and logged.
    6. The vision special tokens (<|image_pad|>, ...) are banned in sampling and left out of the
       training softmax, so the trained distribution is the one vLLM sampled from. For
       Qwen2.5-VL their probability inside a text response is ~0; a sampled one would break the
       next forward pass.
    7. Gold answers without math delimiters are parsed as LaTeX math (`--gold_parse latex`): the
       official parse(gold) reads Geometry3K's "5 \\sqrt { 3 }" as 3, so the wrong \\boxed{3} earned
       r_acc = 1 and the right \\boxed{5\\sqrt{3}} 0. `--gold_parse official` restores it.
    8. Ours, off by default (README "On fewer GPUs"): `--freeze_vision_tower`, `--freeze_merger`
       and LoRA (`--lora_r`, base weights in bf16 under bf16 mixed precision). The paper trains
       every weight; a run with any of them is not the paper's run.
    9. Engineering defaults: `--micro_batch_size` 4 (official 8; memory only, see 2); one vLLM
       engine per training process with tensor parallel 1 and `--gpu_memory_utilization` 0.4
       (official: tensor parallel 4, 0.7): each process pushes its weights into its own engine,
       and the whole model on each GPU leaves less room for the KV cache.

Speed and memory knobs that leave the loss and gradients unchanged
    `--micro_batch_size`, `--gradient_checkpointing`, and `--vision_once` (ours, off by default:
    the G samples of a prompt in one micro-batch share one pass of the vision tower,
    image_features_once; benchmarks/RESULTS.md says what it buys).

Shapes: B = prompts per step, G = responses per prompt, N = responses in a micro-batch,
T = completion tokens (padded), T_all = prompt + completion tokens, V = vocabulary, P = processes.
Prefixes: `local_` = this process's share (B/P prompts, B*G/P responses); no prefix = all
processes; `mb_` = one micro-batch.

Launch
    CPU demo (tiny model, demo data):  make demo
    1 GPU:   accelerate launch --config_file configs/single_gpu.yaml train_grpo.py --dataset PATH
    8 GPUs:  accelerate launch --config_file configs/deepspeed_zero3.yaml train_grpo.py \\
                 --dataset tongxiao2002/Perception-R1-Dataset --val_dataset PATH \\
                 --judge.backend openai --judge.base_urls http://JUDGE:8000/v1
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import tyro

import data
from judge import JudgeArgs, build_judge, has_annotations


# =============================================================================================
# 1. Args
# =============================================================================================
@dataclasses.dataclass
class Args:
    # --- task ---
    task: Literal["geometry", "grounding", "counting", "ocr", "detection"] = "geometry"
    """geometry: Perception-R1 (arXiv 2506.07218), the four rewards below. grounding / counting /
    ocr / detection: the sister paper's rule-based perception rewards (arXiv 2504.07954,
    perception_rewards.py) on rows with a `task` column; no judge, no instruction"""
    iou_power: float = 2.0
    """grounding: r = IoU ** iou_power (sister paper's released code: IoU**2; 1 = plain IoU)"""
    detection_penalty: bool = False
    """detection: subtract 0.5 * (false-positive rate + miss rate) (released code: off)"""

    # --- model and data ---
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """policy checkpoint: hub id or local folder (paper: Qwen2.5-VL-7B-Instruct)"""
    dataset: str = "demo_data/train.jsonl"
    """training rows: local .jsonl/.parquet or a Hugging Face dataset id, training schema
    (problem with <image>, answer, images, visual_key_info). Paper: the authors' 1,442 annotated
    Geometry3K problems, tongxiao2002/Perception-R1-Dataset (annotate.py builds such a file)."""
    split: str = "train"
    """split to read when `dataset` is a Hugging Face id"""
    skip_bad_rows: bool = False
    """every row (and every image, opened and verified) is checked before the first step; bad rows
    stop the run with a list of all of them (row, field, reason). True: drop them and go on (ours)"""
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
    instruction: str = data.INSTRUCTION
    """text appended to every problem (after one space), or @FILE to read it from a file. Default:
    our paraphrase with exactly the official requirements; the authors' own text is the SYSTEM_PROMPT
    of their training script (README, "Prompt")"""
    gold_parse: Literal["latex", "official"] = "latex"
    """how math-verify reads a gold answer: "latex" = an answer without math delimiters is parsed as
    LaTeX math (ours: "5 \\sqrt { 3 }" -> 5*sqrt(3)); "official" = parsed as stored, as the official
    code does (it keeps only the trailing 3, so the wrong \\boxed{3} scores 1). Bit-exact
    reproduction: official"""

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
    """sampling temperature of the rollouts; the training logits are divided by it too, so the loss
    sees the distribution that was sampled (official: 1.0)"""
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
    """loss aggregation: mean over all response tokens of the batch (official) or mean over
    responses of each response's token mean"""
    adv_eps: float = 1e-6
    """eps in (r - mean) / (std + eps) (official: 1e-6)"""
    kl_coef: float = 0.0
    """beta for the k3 KL penalty to a frozen reference (official: 0 = off, no reference loaded;
    EasyR1's generic config uses 1e-2 when on)"""
    tis_cap: float | None = None
    """truncated importance sampling: multiply each token's loss by min(pi_old / pi_vllm, tis_cap),
    correcting for the gap between the vLLM sampler and the trained policy (ours, as TRL's
    vllm_importance_sampling_cap / verl's rollout correction; None = off, the official setting)"""

    # --- rewards ---
    w_acc: float = 0.9
    """weight of r_acc (official: 0.9)"""
    w_fmt: float = 0.1
    """weight of r_fmt (official: 0.1)"""
    w_vis: float = 0.7
    """weight of r_v, the visual perception reward (official: 0.7; paper: 0.1..0.9 all similar).
    0 = no judge at all (the paper's "without r_v" ablation)"""
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
    """gradient-norm clip (official: 1.0). A step whose gradient norm is not finite is skipped
    (official) and counted in train/skipped_steps"""
    micro_batch_size: int = 4
    """responses per forward/backward pass per process (memory knob; does not change the maths;
    official: 8, ours 4 to halve the worst-case activations). Under DeepSpeed it is also
    DeepSpeed's train_micro_batch_size_per_gpu"""
    vision_once: bool = False
    """run the vision tower once per prompt of a micro-batch and reuse its features for that prompt's
    samples (gradients add up in backward): the same loss and gradients, fewer vision FLOPs (ours,
    off by default; benchmarks/RESULTS.md). Best with micro_batch_size a multiple of group_size"""
    gradient_checkpointing: bool | None = None
    """recompute activations in backward (vision tower included) to save memory; None = on when a
    GPU is present (official: on), off on CPU where memory is not the limit"""

    # --- fewer GPUs (README "On fewer GPUs"; ours, off by default: the paper trains everything) ---
    freeze_vision_tower: bool = False
    """the vision encoder gets no gradient and no optimizer state, and is not re-sent to vLLM"""
    freeze_merger: bool = False
    """with --freeze_vision_tower, freeze the vision-to-language merger too (default: it trains)"""
    lora_r: int = 0
    """LoRA rank on the language model (PEFT); 0 = full fine-tune (official). Only the adapters
    train; vLLM receives merged weights; the KL reference (if any) is the adapter switched off"""
    lora_alpha: float = 32.0
    """LoRA scaling alpha (the update is alpha / r * B A)"""
    lora_dropout: float = 0.0
    """dropout on the LoRA input"""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """linear layers of the language model that get adapters (the vision tower never does, as in EasyR1)"""

    # --- validation (official: before training and every 5 steps, greedy) ---
    val_dataset: str | None = None
    """held-out rows in the training schema (local file or Hugging Face id); None = no validation.
    Each validation writes <output_dir>/val/step-<N>.jsonl, readable by `evaluate.py compare`"""
    val_split: str = "test"
    """split to read when `val_dataset` is a Hugging Face id"""
    val_every: int = 5
    """validate after every N rollout steps, and after the last one (official: 5)"""
    val_before_train: bool = True
    """validate once before the first step (official: true)"""
    val_limit: int | None = None
    """use only the first N validation rows (None = all)"""

    # --- vLLM ---
    gpu_memory_utilization: float = 0.4
    """share of GPU memory vLLM may take in each training process (official: 0.7 with tensor
    parallel 4; ours 0.4: every GPU holds the whole model)"""
    tensor_parallel_size: int = 1
    """vLLM tensor parallel size inside each process (official: 4; ours: 1, one engine per training
    process; > 1 only with a single training process)"""
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
    """continue from the newest checkpoint in output_dir (logs past its step are dropped)"""
    overwrite: bool = False
    """start afresh in an output_dir that holds a run, deleting its checkpoints and logs (without
    it, and without --resume, such a folder is refused)"""
    resume_with_changes: bool = False
    """--resume even where settings that change the run's maths (lr, G, batch, rewards, model...)
    differ from the checkpoint's (otherwise the differences are listed and the run stops)"""
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """metrics sink besides stdout and metrics.jsonl (wandb is opt-in)"""

    def __post_init__(self):
        self.instruction = data.resolve_instruction(self.instruction)  # @FILE -> its text


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


_MATH_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


def parse_gold(answer: str, gold_parse: str = "latex", timeout_s: int | None = 5):
    """math-verify's reading of a gold answer.

    "official": parse(answer) as stored, as the official code does. A bare-LaTeX answer is then
    misread: parse("5 \\sqrt { 3 }") keeps only the trailing 3 (a quarter of Geometry3K's answers).
    "latex" (default): an answer without math delimiters ($, \\(, \\[, \\boxed) is parsed as LaTeX
    math, parse("$5 \\sqrt { 3 }$") -> 5*sqrt(3); plain numbers read the same either way.
    """
    from math_verify import parse

    if gold_parse == "latex" and not any(d in answer for d in _MATH_DELIMITERS):
        answer = f"${answer}$"
    elif gold_parse not in ("latex", "official"):
        raise ValueError(f"gold_parse must be 'latex' or 'official', got {gold_parse!r}")
    return parse(answer, parsing_timeout=timeout_s)


def math_equal(gold: str, given: str, gold_parse: str = "latex", timeout_s: int | None = 5) -> bool:
    """The one answer checker (training, annotation and evaluation): math-verify's
    verify(parse_gold(gold), parse(given)), gold first. Any exception counts as not equal."""
    from math_verify import parse, verify

    try:
        return bool(verify(parse_gold(str(gold).strip(), gold_parse, timeout_s), parse(given, parsing_timeout=timeout_s),
                           timeout_seconds=timeout_s))
    except Exception:  # official behaviour: unparsable or timed out -> not equal
        return False


def accuracy_reward(response: str, answer: str, gold_parse: str = "latex", answer_dotall: bool = False,
                    timeout_s: int | None = 5) -> float:
    """r_acc in {0, 1}: math_equal(gold, given).

    `given` is the <answer> block when the official regex finds one, else the whole response.
    math-verify's timeouts rely on signals, which only work in a process's main thread: call this
    from the main thread (train_grpo does; the judge runs in a worker thread) or pass timeout_s=None.
    """
    match = (ANSWER_PATTERN_DOTALL if answer_dotall else ANSWER_PATTERN).search(response)
    given = match.group(1).strip() if match else response.strip()
    return 1.0 if math_equal(answer, given, gold_parse, timeout_s) else 0.0


def gold_parse_report(answers: list[str], where: str = "dataset", names: list[str] | None = None) -> tuple[int, str]:
    """How many gold answers the two --gold_parse policies read differently, and a line saying so
    with examples (`names` label the answers in it; default "row <i>")."""
    from math_verify import verify

    differ = []
    for i, a in enumerate(answers):
        try:
            same = verify(parse_gold(str(a), "official"), parse_gold(str(a), "latex"))
        except Exception:
            same = False
        if not same:
            differ.append(i)
    names = names or [f"row {i}" for i in range(len(answers))]
    examples = "; ".join(f"{names[i]}: {answers[i]!r}" for i in differ[:3])
    return len(differ), (f"{where}: {len(differ)} of {len(answers)} gold answers are read differently by "
                         f"--gold_parse latex (default) and official" + (f" (e.g. {examples})" if differ else ""))


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


# A reward term maps (response, row) -> float. "visual" has no function here: the judging LLM
# scores whole batches at once (judge.py), concurrently with the cheap terms (see score_responses).
RewardFn = Callable[[str, dict], float]


def reward_table(args: Args) -> dict[str, tuple[float, RewardFn | None]]:
    """name -> (weight, reward function): the paper's R = 0.9 r_acc + 0.1 r_fmt + 0.7 r_v + r_p,
    or a perception task's table (task_reward_table).

    To add a reward: write a pure function (response, row) -> float and add one line here;
    logging, the sample table and validation follow from this table.
    """
    if args.task != "geometry":
        return task_reward_table(args)
    table = {
        "accuracy": (args.w_acc, lambda resp, row: accuracy_reward(resp, str(row["answer"]), args.gold_parse)),
        "format": (args.w_fmt, lambda resp, row: format_reward(resp)),
        "visual": (args.w_vis, None),  # r_v from the judging LLM (judge.py)
        "repetition": (1.0, lambda resp, row: repetition_penalty(resp, args.rep_ngram, args.rep_max_penalty)),
    }
    return {name: term for name, term in table.items() if term[0] != 0 or name != "visual"}


def task_reward_table(args: Args) -> dict[str, tuple[float, RewardFn | None]]:
    """The sister paper's rewards (arXiv 2504.07954; released weights), one table per task:

        grounding   R = IoU(box, gold) ** 2 + r_fmt
        counting    R = min(P,G)/max(P,G) * (1 - mean matched distance / image diagonal)
        ocr         R = 1 - edit distance / max length
        detection   R = 0.25 fmt + 0.75 F1 + class accuracy + mean IoU   (in [0, 3])

    plus "parsed" (weight 0, logged): 1 when the answer parses at all, so unparsable outputs are
    counted. Gold coordinates are scaled into the frame the model answers in (task_gold).
    """
    import perception_rewards as pr

    task = args.task
    parsed = (0.0, lambda resp, row: float(bool(resp.strip())) if task == "ocr" else float(pr.parse_points(resp) is not None))
    if task == "grounding":
        return {"iou": (1.0, lambda resp, row: pr.grounding_reward(resp, task_gold(row)["box"], args.iou_power)),
                "format": (1.0, lambda resp, row: pr.grounding_format_reward(resp)), "parsed": parsed}
    if task == "counting":
        return {"counting": (1.0, lambda resp, row: pr.counting_reward(resp, task_gold(row)["points"],
                                                                       task_gold(row)["diagonal"])), "parsed": parsed}
    if task == "ocr":
        return {"ocr": (1.0, lambda resp, row: pr.ocr_reward(resp, str(row["answer"]))), "parsed": parsed}
    return {"detection": (1.0, lambda resp, row: pr.detection_reward(
        resp, task_gold(row)["boxes"], task_gold(row)["labels"], row["classes"], penalty=args.detection_penalty)),
        "parsed": parsed}


def task_gold(row: dict) -> dict:
    """A perception row's gold answer in the frame the model answers in. Qwen2.5-VL writes boxes in
    pixels of the image it is given, i.e. after our resize to the 28-px grid, so gold coordinates
    (pixels of the original image, in the row's `answer` JSON) are scaled by resized / original
    size (row["_scale"], set when the images are opened; 1 without it). grounding: {"box"};
    counting: {"points", "diagonal"}; detection: {"boxes", "labels"}."""
    sx, sy, w, h = row.get("_scale", (1.0, 1.0, 0, 0))
    gold = json.loads(row["answer"])
    if row["task"] == "grounding":
        return {"box": [gold[0] * sx, gold[1] * sy, gold[2] * sx, gold[3] * sy]}
    if row["task"] == "counting":
        return {"points": [[x * sx, y * sy] for x, y in gold], "diagonal": math.hypot(w, h) if w else 1000 * math.sqrt(2)}
    return {"boxes": [[e["bbox_2d"][0] * sx, e["bbox_2d"][1] * sy, e["bbox_2d"][2] * sx, e["bbox_2d"][3] * sy]
                      for e in gold], "labels": [e["label"] for e in gold]}


def task_correct(task: str, response: str, row: dict, accuracy: float | None = None) -> bool:
    """Whether a validation answer is right: geometry r_acc = 1; grounding IoU >= 0.5 (Acc@0.5);
    counting the exact count; OCR the exact text; detection every gold object found (IoU > 0.5,
    same label) and nothing else (precision = recall = 1)."""
    import perception_rewards as pr

    if task == "geometry":
        return accuracy == 1.0
    if task == "ocr":
        return " ".join(response.split()) == " ".join(str(row["answer"]).split())
    gold = task_gold(row)
    if task == "grounding":
        return pr.grounding_hit(response, gold["box"])
    if task == "counting":
        return pr.predicted_count(response) == len(gold["points"])
    pred = pr.detection_predictions(response, row["classes"])
    target = list(zip(gold["boxes"], gold["labels"]))
    if len(pred) != len(target):
        return False
    pairs = pr.hungarian_match(pr.detection_cost(pred, target)) if pred else []
    return all(pr.box_iou(pred[i][0], target[j][0]) > 0.5 and pred[i][1] == target[j][1] for i, j in pairs)


def task_row_errors(row: dict, task: str) -> list[str]:
    """What keeps a row from serving a perception task (its `task` column and gold answer)."""
    name = data.row_name(row)
    if (row.get("task") or "geometry") != task:
        return [f"{name}: field 'task' is {row.get('task')!r}, but this run trains --task {task}"]
    if task == "ocr":
        return []
    try:
        gold = task_gold(row)
        if task == "detection":
            bad = [lab for lab in gold["labels"] if lab not in (row.get("classes") or [])]
            if bad:
                return [f"{name}: field 'answer' has labels {bad} not in field 'classes'"]
    except (ValueError, TypeError, KeyError, IndexError) as e:
        return [f"{name}: field 'answer' is not a {task} answer ({type(e).__name__}: {e})"]
    return []


def with_frame(row: dict, images: list) -> dict:
    """The row plus `_scale` = (x scale, y scale, width, height) of its (first) resized image."""
    w0, h0 = images[0].info.get("original_size", images[0].size)
    return {**row, "_scale": (images[0].width / w0, images[0].height / h0, images[0].width, images[0].height)}


def mix_rewards(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """R = sum_i w_i r_i over the reward terms; every term has shape (B*G,)."""
    return sum(weights[name] * r for name, r in terms.items())


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
# 4. Token log-probs without a full (B*G, T, V) log-softmax
# =============================================================================================
class _TokenLogps(torch.autograd.Function):
    """log p(y) = x_y - logsumexp(x) with x = logits[r] / temperature for L (position r, token y)
    pairs of a (R, V) logits matrix, a block of positions at a time; the entropy of the same
    softmax, sum_v p x_v subtracted from lse, comes from the same block (no gradient), when asked.

    Memory: besides the logits and their one gradient tensor (zero where no pair reads a row),
    only float32 blocks of about 2^22 values (16 MB) exist. Backward recomputes the softmax block
    by block and writes d loss / d logits = (onehot(y) - p) * g / tau into the gradient. A plain
    log_softmax keeps a float32 copy of the logits for backward and makes another in backward
    (4.8 GB each for 8k tokens of Qwen's 152k vocabulary).
    """

    @staticmethod
    def forward(ctx, logits, rows, targets, temperature, banned_ids, with_entropy):
        L, dtype = rows.shape[0], torch.promote_types(logits.dtype, torch.float32)  # at least float32
        logps, lse, entropy = logits.new_empty(L, dtype=dtype), logits.new_empty(L, dtype=dtype), logits.new_zeros(L, dtype=dtype)
        for s, e in _blocks(L, logits.shape[-1]):
            x = _scaled(logits[rows[s:e]], temperature, banned_ids)  # (block, V)
            lse[s:e] = torch.logsumexp(x, dim=-1)
            logps[s:e] = x.gather(-1, targets[s:e, None]).squeeze(-1) - lse[s:e]
            if with_entropy:
                p = torch.exp(x - lse[s:e, None])
                entropy[s:e] = lse[s:e] - (p * x.nan_to_num(neginf=0.0)).sum(-1)
        ctx.save_for_backward(logits, rows, targets, lse)
        ctx.temperature, ctx.banned_ids = temperature, banned_ids
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        logits, rows, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for s, e in _blocks(rows.shape[0], logits.shape[-1]):
            g = grad_logps[s:e, None] / ctx.temperature  # (block, 1)
            dx = torch.exp(_scaled(logits[rows[s:e]], ctx.temperature, ctx.banned_ids) - lse[s:e, None])  # softmax
            dx.mul_(-g).scatter_add_(-1, targets[s:e, None], g.to(dx.dtype))  # (onehot - p) * g / tau
            grad.index_add_(0, rows[s:e], dx.to(grad.dtype))
        return grad, None, None, None, None, None


def _blocks(n: int, width: int, values: int = 2 ** 22) -> list[tuple[int, int]]:
    """(start, end) ranges over n rows of `width` values, about `values` values per block."""
    step = max(1, values // width)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _scaled(x, temperature, banned_ids):
    """x / temperature in at least float32 with the banned columns at -inf (x is a fresh copy)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype) if temperature == 1.0 else x.to(dtype) / temperature
    if banned_ids is not None and len(banned_ids):
        x.index_fill_(-1, banned_ids, float("-inf"))
    return x


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                with_entropy: bool = False, banned_ids: torch.Tensor | None = None):
    """log softmax(logits / temperature)[target] per position and the entropy of that softmax,
    computed as logit - logsumexp one block of positions at a time (see _TokenLogps): memory stays
    at one float32 block whatever the length and V (152k for Qwen2.5-VL).

    Dividing by the rollout temperature makes these the log-probs of the distribution vLLM sampled
    from (official code, TRL and EasyR1 do the same). `banned_ids` (the vision special tokens, which
    sampling never emits) are left out of the softmax for the same reason.
    logits: (..., V), targets: (...) -> logps [, entropy (no gradient)], shaped like targets
    """
    flat = logits.reshape(-1, logits.shape[-1])
    rows = torch.arange(flat.shape[0], device=logits.device)
    logps, entropy = _TokenLogps.apply(flat, rows, targets.reshape(-1), temperature, banned_ids, with_entropy)
    logps, entropy = logps.view(targets.shape), entropy.view(targets.shape)
    return (logps, entropy) if with_entropy else logps


# =============================================================================================
# 5. Clipped surrogate with clip-higher, dual clip and optional TIS weights
# =============================================================================================
def aggregate(values: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean",
              num_tokens: float | None = None, num_seqs: float | None = None) -> torch.Tensor:
    """Reduce per-token values (N, T) to a scalar.

    token-mean:          sum(v * mask) / num_tokens             (num_tokens defaults to mask.sum())
    seq-mean-token-mean: sum_i (sum_t v_it m_it / sum_t m_it) / num_seqs   (num_seqs defaults to N)
    The denominators are parameters so that a micro-batch can be divided by the count of the
    whole batch (train_on_batch passes the counts of all processes).
    """
    mask = mask.to(values.dtype)
    if loss_agg == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return (values * mask).sum() / max(float(denom), 1.0)
    if loss_agg == "seq-mean-token-mean":
        seq_means = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (N,)
        return seq_means.sum() / (values.shape[0] if num_seqs is None else num_seqs)
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.3,
                dual_clip: float = 3.0, loss_agg: str = "token-mean", num_tokens: float | None = None,
                num_seqs: float | None = None, tis_weights: torch.Tensor | None = None):
    """PPO-clip loss per token, aggregated (see `aggregate`).

        ratio   = exp(logp - old_logp)
        l_clip  = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))
        l       = min(l_clip, -A c)  where A < 0   (dual clip bounds the loss of very
                  unlikely-now actions with negative advantage)
        l       = l * w   with TIS weights w (no gradient) when given
    logps/old_logps/mask/tis_weights: (N, T); advantages: (N,) broadcast over tokens.
    Returns (loss, stats dict of detached tensors).
    """
    adv = advantages.unsqueeze(-1)  # (N, 1)
    ratio = torch.exp(logps - old_logps)  # (N, T)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_clip = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = torch.minimum(loss_clip, -adv * dual_clip)
    per_token = torch.where(adv < 0, loss_dual, loss_clip)  # (N, T)
    if tis_weights is not None:
        per_token = per_token * tis_weights.detach()
    loss = aggregate(per_token, mask, loss_agg, num_tokens, num_seqs)
    with torch.no_grad():
        m = mask.to(per_token.dtype)
        n = m.sum().clamp(min=1)
        stats = {
            "clip_frac": (((loss_clipped > loss_unclipped) & (m > 0)).float().sum() / n),
            "dual_clip_frac": (((adv < 0) & (loss_clip > -adv * dual_clip) & (m > 0)).float().sum() / n),
            "ratio_mean": (ratio * m).sum() / n,
        }
    return loss, stats


# =============================================================================================
# 6. KL to the reference policy (k3) and the rollout/trainer mismatch
# =============================================================================================
def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, an unbiased, low-variance
    estimate of KL(pi || ref) from samples of pi. Log-ratio clamped to +-20 and the value to
    [-10, 10] as in EasyR1's "low_var_kl". Shapes (N, T) -> (N, T)."""
    log_ratio = (ref_logps - logps).clamp(-20.0, 20.0)
    return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)


def tis_weights(old_logps: torch.Tensor, vllm_logps: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_vllm, cap) per token, no gradient: the tokens
    were sampled by vLLM, whose numerics differ from the trainer's. Shapes (N, T) -> (N, T)."""
    return torch.exp(old_logps - vllm_logps).clamp(max=cap).detach()


# =============================================================================================
# 7. Data: every row checked before the first step
# =============================================================================================
def load_checked_rows(accelerator, source: str, split: str, args: Args, what: str,
                      require_facts: bool, limit: int | None = None) -> list[dict]:
    """Load rows and check all of them (schema, and every image opened and verified) before any
    GPU time is spent. The check is sharded over processes and gathered. Bad rows are reported all
    at once (row, field, reason); the run stops unless --skip_bad_rows drops them."""
    from accelerate.utils import gather_object

    rows = data.load_rows(source, split, limit=limit)
    if not rows:
        raise ValueError(f"{source}: no rows")
    rank, world = accelerator.process_index, accelerator.num_processes
    local = data.find_bad_rows(rows[rank::world], require_facts, desc=f"checking {what} rows",
                               progress=accelerator.is_main_process)
    if args.task != "geometry":  # a perception task: its `task` column and a readable gold answer
        for row in rows[rank::world]:
            if errors := task_row_errors(row, args.task):
                local[row["_index"]] = local.get(row["_index"], []) + errors
    bad = dict(gather_object(list(local.items())) if world > 1 else local)  # PLUMBING: every rank sees all
    if not bad:
        return rows
    report = "\n".join(f"  {reason}" for i in sorted(bad) for reason in bad[i])
    if not args.skip_bad_rows:
        raise data.RowError(f"{source}: {len(bad)} of {len(rows)} {what} rows are unusable:\n{report}\n"
                            "(fix them, or pass --skip_bad_rows to drop them)")
    accelerator.print(f"{source}: dropping {len(bad)} of {len(rows)} {what} rows (--skip_bad_rows):\n{report}")
    return [r for r in rows if r["_index"] not in bad]


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
    # PLUMBING: the engine must live in this process: the weight sync hands it a generator of
    # tensors, which cannot cross a process boundary.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    on_cpu = not torch.cuda.is_available()
    from vllm import LLM

    max_model_len = args.max_prompt_length + args.max_response_length
    local_rollouts = args.prompts_per_step * args.group_size // num_processes
    kwargs = data.vllm_cpu_settings(args.model, max_model_len, max_seqs=local_rollouts)
    if on_cpu:
        # Seeded requests whose prefill gets split into chunks make vLLM rewind the sampler's
        # random generator, which CPU generators cannot do: give prefill room for every prompt.
        kwargs["max_num_batched_tokens"] = 64 * max_model_len
    if num_processes > 1 and not on_cpu:
        # each rank runs its own engine inside the torch.distributed world accelerate set up
        kwargs["distributed_executor_backend"] = "external_launcher"
    return LLM(
        model=args.model,
        dtype="float32" if on_cpu else args.dtype,
        enforce_eager=args.enforce_eager or on_cpu,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=max_model_len,
        seed=args.seed + rank,
        limit_mm_per_prompt={"image": max_images},
        mm_processor_kwargs={"min_pixels": args.min_pixels, "max_pixels": args.max_pixels},
        enable_sleep_mode=args.vllm_sleep,
        # The log-prob vLLM reports for each sampled token must be that of the distribution it
        # sampled from: after temperature (and top-p, logit bias). The default "raw_logprobs" is
        # before them, and would differ from our temperature-scaled policy at any tau != 1.
        logprobs_mode="processed_logprobs",
        **kwargs,
    )


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the vision special tokens, which a response must never contain (sampling bans them)."""
    names = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in names]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def generate_rollouts(llm, prompts: list[str], images: list[list], args: Args, tag: str,
                      forbidden_ids: list[int], n: int, greedy: bool = False, seed: int = 0):
    """n samples per prompt (groups contiguous). Returns (completion token ids, vLLM's log-prob of
    each sampled token): two lists of B*n lists.

    Each request gets multi_modal_uuids unique to `tag` (one per step): after a weight sync,
    vision-encoder outputs cached under an old key would be stale. Sampling seeds depend on `seed`
    (a function of run seed, step and rank) so that a resumed run regenerates exactly the samples
    an uninterrupted run saw.
    """
    from vllm import SamplingParams

    requests, params = [], []
    for i, (prompt, imgs) in enumerate(zip(prompts, images)):
        requests.append({"prompt": prompt, "multi_modal_data": {"image": imgs},
                         "multi_modal_uuids": {"image": [f"{tag}-p{i}-i{k}" for k in range(len(imgs))]}})
        params.append(SamplingParams(
            n=n, temperature=0.0 if greedy else args.temperature, top_p=1.0 if greedy else args.top_p,
            max_tokens=args.max_response_length, logprobs=0,  # 0: only the sampled token's log-prob
            seed=(seed + i * n) % (2**31),  # vLLM seeds sample g of a request with seed + g
            logit_bias={t: -100.0 for t in forbidden_ids},  # never sample vision special tokens
            # PLUMBING: token ids only (we decode once, ourselves) and log-probs as flat lists:
            # vLLM's per-token text and per-position dicts cost more than sampling the tiny model
            detokenize=False, flat_logprobs=True,
        ))
    outputs = llm.generate(requests, params, use_tqdm=False)
    ids = [list(o.token_ids) for out in outputs for o in out.outputs]
    # with logprobs=0 each position holds exactly one entry: the sampled token's log-prob
    logps = [list(o.logprobs.logprobs) for out in outputs for o in out.outputs]
    assert all(len(lp) == len(t) for lp, t in zip(logps, ids)), "vLLM: one log-prob per sampled token expected"
    return ids, logps


def rollout_seed(args: Args, step: int, rank: int) -> int:
    """Sampling seed of a process's requests at `step`, spaced so that no two requests share one."""
    return args.seed * 1_000_003 + step * 100_003 + rank * 10_007 * args.group_size


# =============================================================================================
# 9. Training step: micro-batches, gradient accumulation, one or more updates
# =============================================================================================
def collate(samples: list[dict], pad_id: int, banned_ids: list[int] = (), vision_once: bool = False) -> dict:
    """Right-pad prompt+completion ids of a micro-batch; concatenate image patches in order.
    `banned_ids`: token ids sampling never emits, left out of the training softmax too.
    `vision_once`: keep each prompt's patches once (its G samples share one encoding) and list, per
    image of the batch, which kept image it is (`image_source`)."""
    lengths = [len(s["prompt_ids"]) + len(s["completion_ids"]) for s in samples]
    T_all, T = max(lengths), max(len(s["completion_ids"]) for s in samples)
    N = len(samples)
    input_ids = torch.full((N, T_all), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((N, T_all), dtype=torch.long)
    completion_ids = torch.full((N, T), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((N, T), dtype=torch.float32)
    vllm_logps = torch.zeros((N, T), dtype=torch.float32)
    positions = torch.zeros((N, T), dtype=torch.long)  # index of the logit predicting each token
    mm_token_type_ids = torch.zeros((N, T_all), dtype=torch.int32)  # 1 = image token (M-RoPE needs it)
    for i, s in enumerate(samples):
        ids, c = s["prompt_ids"] + s["completion_ids"], len(s["completion_ids"])
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        mm_token_type_ids[i, :len(s["prompt_ids"])] = torch.tensor(s["mm_token_type_ids"])
        completion_ids[i, :c] = torch.tensor(s["completion_ids"])
        completion_mask[i, :c] = 1.0
        vllm_logps[i, :c] = torch.tensor(s["vllm_logps"], dtype=torch.float32)
        positions[i, :c] = torch.arange(len(s["prompt_ids"]) - 1, len(ids) - 1)
    mb = {
        "input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids,
        "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples]),
        "completion_ids": completion_ids, "completion_mask": completion_mask, "positions": positions,
        "vllm_logps": vllm_logps, "advantages": torch.tensor([s["advantage"] for s in samples]),
        "banned_ids": torch.tensor(list(banned_ids), dtype=torch.long),
    }
    if not vision_once:
        mb["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
        return mb
    start: dict[int, int] = {}  # id(a prompt's pixel_values) -> index of its first kept image
    kept, source = [], []
    for s in samples:  # samples of one prompt share its encoding object (build_samples)
        key, n = id(s["pixel_values"]), len(s["image_grid_thw"])
        if key not in start:
            start[key] = sum(len(k["image_grid_thw"]) for k in kept)
            kept.append(s)
        source += range(start[key], start[key] + n)
    mb.update(pixel_values=torch.cat([k["pixel_values"] for k in kept]),
              kept_grid_thw=torch.cat([k["image_grid_thw"] for k in kept]), image_source=torch.tensor(source))
    return mb


def image_features_once(model, mb: dict, autocast=contextlib.nullcontext) -> dict:
    """--vision_once: the vision tower on each kept image once; the features of every image of the
    micro-batch are views of those, so backward sums the G samples' gradients into one encoding.
    Returned in the form Qwen2.5-VL's forward takes precomputed features (`mm_encoder_outputs`).
    `autocast`: accelerate's mixed-precision context (this call is outside the model's forward,
    which accelerate wraps in it)."""
    with autocast():
        out = getattr(model, "module", model).get_image_features(mb["pixel_values"], mb["kept_grid_thw"])
    out.pooler_output = tuple(out.pooler_output[j] for j in mb["image_source"].tolist())
    return {"image": out}


def forward_logps(model, mb: dict, temperature: float = 1.0, with_entropy: bool = False,
                  autocast=contextlib.nullcontext):
    """Token log-probs of the completion tokens of a collated micro-batch: (N, T).

    The model is asked only for the logits of the last `keep` positions (`logits_to_keep`),
    those that predict completion tokens: for a 7B model with V = 152k, full (N, T_all, V) logits
    of 8k-token sequences would take ~10 GB per micro-batch of 4.
    """
    T_all = mb["input_ids"].shape[1]
    first = int(mb["positions"][mb["completion_mask"] > 0].min()) if mb["completion_mask"].any() else T_all - 1
    keep = T_all - first
    # mm_token_type_ids marks the image tokens: without it transformers cannot build Qwen2.5-VL's 3-D
    # (M-RoPE) positions and silently falls back to 1-D ones, unlike vLLM.
    vision = ({"mm_encoder_outputs": image_features_once(model, mb, autocast)} if "image_source" in mb
              else {"pixel_values": mb["pixel_values"]})
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                mm_token_type_ids=mb["mm_token_type_ids"], image_grid_thw=mb["image_grid_thw"],
                use_cache=False, logits_to_keep=keep, **vision)
    logits = out.logits  # (N, keep, V), position p of the sequence is row p - first
    N, keep, V = logits.shape
    mask = mb["completion_mask"] > 0  # (N, T)
    # flat index of the logit predicting each completion token: one gradient tensor for all rows
    rows = (torch.arange(N, device=logits.device)[:, None] * keep + mb["positions"] - first)[mask]  # (L,)
    lp, ent = _TokenLogps.apply(logits.reshape(N * keep, V), rows, mb["completion_ids"][mask], temperature,
                                mb.get("banned_ids"), with_entropy)
    logps = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)  # (N, T)
    entropy = torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).masked_scatter(mask, ent)
    return (logps, entropy) if with_entropy else logps


def global_counts(accelerator, micro: list[dict]) -> tuple[float, float]:
    """Denominators of the loss for each process: (tokens, sequences) of the whole batch over all
    processes, divided by the number of processes. DDP (and DeepSpeed) average the processes'
    gradients, so dividing each process's sum by count/P gives exactly grad(sum / count)."""
    local = torch.tensor([sum(float(mb["completion_mask"].sum()) for mb in micro),
                          float(sum(mb["input_ids"].shape[0] for mb in micro))], device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum")  # PLUMBING: sum over processes
    return float(total[0]) / accelerator.num_processes, float(total[1]) / accelerator.num_processes


def set_accumulation_boundary(accelerator, last: bool) -> None:
    """Mark whether this micro-batch ends the accumulation: gradients are synchronised (DDP
    all-reduce) and DeepSpeed's engine steps only then. accelerate reads this flag in backward();
    its public `accumulate()` context counts calls against a fixed gradient_accumulation_steps and
    divides the loss by it, which our whole-batch normalisation does not want. Private API:
    tested on accelerate 1.15.0, the version `make install` resolves today."""
    accelerator.gradient_state._set_sync_gradients(last)


def train_on_batch(model, ref_model, optimizer, scheduler, accelerator, samples: list[dict],
                   args: Args, pad_id: int, banned_ids: list[int] = ()) -> dict:
    """One rollout batch: optional old/ref log-prob passes, then `ppo_epochs` optimizer steps,
    each accumulating gradients over micro-batches. Returns stats averaged over micro-batches."""
    device = accelerator.device
    micro = [collate(samples[i:i + args.micro_batch_size], pad_id, banned_ids, args.vision_once)
             for i in range(0, len(samples), args.micro_batch_size)]
    num_tokens, num_seqs = global_counts(accelerator, micro)  # ALGO: one token-mean for the whole batch
    to_dev = lambda mb: {k: v.to(device) for k, v in mb.items()}  # noqa: E731  PLUMBING

    # ALGO: old log-probs are needed only when the policy moves between updates (ppo_epochs > 1);
    # with one update the ratio is exactly 1 and old_logps = logps.detach() costs nothing.
    with torch.no_grad():
        for mb in micro:
            if args.ppo_epochs > 1:
                mb["old_logps"] = forward_logps(model, to_dev(mb), args.temperature,
                                                autocast=accelerator.autocast).cpu()
            if ref_model is not None:  # ALGO: reference log-probs only when KL is on
                mb["ref_logps"] = forward_logps(ref_model, to_dev(mb), args.temperature,
                                                autocast=accelerator.autocast).cpu()

    stats: dict[str, list[float]] = {}
    for epoch in range(args.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        for k, mb in enumerate(micro):
            last = k == len(micro) - 1
            set_accumulation_boundary(accelerator, last)  # PLUMBING
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                mb_stats = micro_batch_step(model, to_dev(mb), accelerator, args, num_tokens, num_seqs,
                                            measure_mismatch=epoch == 0)
            for key, val in mb_stats.items():
                stats.setdefault(key, []).append(val)
        optimizer_step(model, optimizer, scheduler, accelerator, args, stats)
    return summarize_train_stats(stats, args.ppo_epochs)


def micro_batch_step(model, mb: dict, accelerator, args: Args, num_tokens: float, num_seqs: float,
                     measure_mismatch: bool) -> dict[str, float]:
    """Forward, loss and backward of one micro-batch; returns its stats."""
    logps, entropy = forward_logps(model, mb, args.temperature, with_entropy=True,
                                   autocast=accelerator.autocast)  # (N, T)
    old = mb["old_logps"] if "old_logps" in mb else logps.detach()  # ALGO: pi_old
    mask = mb["completion_mask"]
    weights = tis_weights(old, mb["vllm_logps"], args.tis_cap) if args.tis_cap else None
    loss, stats = policy_loss(logps, old, mb["advantages"], mask, args.clip_eps_low, args.clip_eps_high,
                              args.dual_clip, args.loss_agg, num_tokens, num_seqs, weights)  # ALGO
    kl = torch.zeros((), device=logps.device)
    if "ref_logps" in mb:  # ALGO: + beta * KL(pi || ref), aggregated like the policy loss
        kl = aggregate(k3_kl(logps, mb["ref_logps"]), mask, args.loss_agg, num_tokens, num_seqs)
        loss = loss + args.kl_coef * kl
    # PLUMBING: DeepSpeed divides the loss by its configured accumulation steps; our loss is
    # already normalised over the whole batch, so undo that.
    accelerator.backward(loss * _deepspeed_gas(accelerator))
    n = mask.sum().clamp(min=1)
    out = {**{k: float(v) for k, v in stats.items()}, "loss": float(loss.detach()),
           "entropy": float((entropy * mask).sum() / n), "kl": float(kl.detach()),
           "tokens": float(mask.sum())}
    if measure_mismatch:  # rollout/trainer gap, measured with pi_old (before this batch's update)
        diff = (old - mb["vllm_logps"]) * mask
        out["mismatch_abs_sum"] = float(diff.abs().sum())
        out["mismatch_k3_sum"] = float((k3_kl(mb["vllm_logps"], old) * mask).sum())
        if weights is not None:
            out["tis_weight_mean"] = float((weights * mask).sum() / n)
    return out


def optimizer_step(model, optimizer, scheduler, accelerator, args: Args, stats: dict) -> None:
    """Clip the gradient norm and step; a non-finite norm skips the update (official behaviour).
    Under DeepSpeed the engine already stepped inside the last backward() and skips a non-finite
    step itself; clip_grad_norm_ then only reports its norm."""
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
    finite = math.isfinite(grad_norm)
    if finite:
        optimizer.step()  # a no-op under DeepSpeed
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()  # the schedule counts updates, skipped or not (as the official trainer)
    stats.setdefault("grad_norm", []).append(grad_norm if finite else float("nan"))
    stats.setdefault("skipped_steps", []).append(0.0 if finite else 1.0)


def summarize_train_stats(stats: dict[str, list[float]], ppo_epochs: int) -> dict[str, float]:
    """Micro-batch stats -> one number each. loss: sum over micro-batches (each is already a share
    of the batch mean), averaged over updates; mismatch: token means; skipped_steps: a count."""
    tokens = sum(stats["tokens"][:len(stats["tokens"]) // ppo_epochs])
    out = {k: float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else float("nan")
           for k, v in stats.items() if not k.startswith("mismatch") and k != "tokens"}
    out["loss"] = float(np.sum(stats["loss"])) / ppo_epochs
    out["skipped_steps"] = float(np.sum(stats["skipped_steps"]))
    out["vllm_logp_abs_diff"] = sum(stats["mismatch_abs_sum"]) / max(tokens, 1.0)
    out["vllm_kl"] = sum(stats["mismatch_k3_sum"]) / max(tokens, 1.0)
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


# =============================================================================================
# 10. Rewards of a batch, and validation
# =============================================================================================
def score_responses(responses: list[str], rows: list[dict], args: Args, judge, pool) -> dict[str, list]:
    """Every reward term of every response: name -> list (B*G,). r_v entries are None where the
    judge gave no verdict. The judge's requests run in a worker thread while the cheap terms run
    here (math-verify's timeouts need the main thread). Raises the judge's error, if any."""
    table = reward_table(args)
    future = None
    if "visual" in table:
        future = pool.submit(judge.score, [row.get("visual_key_info") or "" for row in rows], responses)
    terms = {name: [fn(resp, row) for resp, row in zip(responses, rows)]
             for name, (_, fn) in table.items() if fn is not None}
    if future is not None:
        terms["visual"] = future.result()
    return {name: terms[name] for name in table}  # table order


def validate(llm, judge, pool, processor, val_rows: list[dict], args: Args, accelerator, step: int,
             forbidden_ids: list[int]) -> dict[str, float]:
    """Greedy responses to the validation rows (split over processes), scored with the training
    rewards and the judge. Writes <output_dir>/val/step-<step>.jsonl (one row per problem, the
    fields `evaluate.py compare` reads) and returns val/* metrics."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    local_rows = val_rows[rank::world]
    images = [data.row_images(r, args.min_pixels, args.max_pixels) for r in local_rows]
    local_rows = [with_frame(r, im) for r, im in zip(local_rows, images)]
    prompts = [data.row_prompt(processor, r, len(im), args.instruction) for r, im in zip(local_rows, images)]
    ids, _ = generate_rollouts(llm, prompts, images, args, f"val{step}-r{rank}", forbidden_ids, n=1, greedy=True)
    responses = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    terms = run_together(accelerator, score_responses, responses, local_rows, args, judge, pool)
    records = [{"benchmark": "val", "id": str(row.get("id", row["_index"])), "prompt": prompt, "response": resp,
                "gold": str(row["answer"]),
                "correct": task_correct(args.task, resp, row, terms.get("accuracy", [None] * len(responses))[k]),
                "r_v": terms.get("visual", [None] * len(responses))[k] if has_annotations(row.get("visual_key_info"))
                else None, "rewards": {name: vals[k] for name, vals in terms.items()}}
               for k, (row, prompt, resp) in enumerate(zip(local_rows, prompts, responses))]
    records = gather_object(records) if world > 1 else records  # PLUMBING: all rows on every rank
    if accelerator.is_main_process:
        data.write_jsonl(Path(args.output_dir) / "val" / f"step-{step}.jsonl", records)
    return val_metrics(records)


def val_metrics(records: list[dict]) -> dict[str, float]:
    """val/accuracy, val/format, val/visual (rows with facts and a verdict), val/<term> means."""
    out = {"val/accuracy": float(np.mean([r["correct"] for r in records])), "val/n": float(len(records))}
    for name in records[0]["rewards"]:
        vals = [r["rewards"][name] for r in records if r["rewards"][name] is not None]
        out[f"val/{name}"] = float(np.mean(vals)) if vals else float("nan")
    judged = [r["r_v"] for r in records if r["r_v"] is not None]
    if "visual" in records[0]["rewards"]:
        out["val/visual"] = float(np.mean(judged)) if judged else float("nan")
    return out


# =============================================================================================
# 11. Weight sync, checkpoints, logging (plumbing)
# =============================================================================================
def sync_weights_to_vllm(accelerator, model, llm, changed_only: bool = True) -> None:
    """Push the policy's current weights into the colocated vLLM engine.

    `reload_weights` takes Hugging Face parameter names and handles vLLM's weight repacking
    (plain `load_weights` breaks on CPU). Under DeepSpeed ZeRO-3 parameters are sharded, so
    each one is gathered before it is sent. Prefix and multimodal caches are reset: they hold
    activations computed with the old weights.
    changed_only: send only what training changes (trainable weights; merged layers under LoRA),
    vLLM holding the rest already. False after a level-2 sleep, which discarded vLLM's weights.
    """
    unwrapped = accelerator.unwrap_model(model)
    if getattr(accelerator.state, "deepspeed_plugin", None) and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        def named():
            for name, p in unwrapped.named_parameters():
                if p.requires_grad or not changed_only:
                    with deepspeed.zero.GatheredParameters([p]):
                        yield name, p.data.detach().clone()
        weights = named()
    else:
        weights = iter(policy_weights(unwrapped, changed_only).items())
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()
    llm.reset_mm_cache()


def configure_deepspeed(accelerator, args: Args) -> None:
    """Fill the DeepSpeed settings that must equal our arguments or the official precision, so the
    launch line stays plain.

    accelerate.prepare() needs `train_micro_batch_size_per_gpu` (it would otherwise read it from a
    dataloader, and we have none); DeepSpeed clips gradients itself with `gradient_clipping`.
    Under bf16, DeepSpeed would reduce and accumulate gradients in bf16; the official trainer (FSDP
    mixed precision) reduces them in float32 and keeps float32 gradients, so we ask for both
    (`communication_data_type`, `data_types.grad_accum_dtype`) unless the config sets them.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    if args.lora_r and plugin.zero_stage == 3:
        raise ValueError("--lora_r with DeepSpeed ZeRO-3 is not supported (LoRA fits without sharding the "
                         "parameters): use configs/deepspeed_zero2.yaml or plain DDP")
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm
    plugin.deepspeed_config.setdefault("communication_data_type", "fp32")
    plugin.deepspeed_config.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")


def save_checkpoint(accelerator, model, processor, out: Path, step: int, args: Args, data_state: dict) -> Path:
    """checkpoint-<step>/ = policy/ (HF format, loadable by vLLM and evaluate.py; its
    train_settings.json holds the prompt and pixel bounds the policy was trained with) +
    accelerate state (optimizer, scheduler, RNG per rank) + state.json (step, data position, every
    setting). Written to a temp folder, then renamed, so a kill never leaves a half-written
    checkpoint that --resume would pick."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    unwrapped = accelerator.unwrap_model(model)
    lora = hasattr(unwrapped, "get_base_model")
    state_dict = policy_weights(unwrapped) if lora else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if lora:  # the adapter alone, and the merged policy that vLLM and evaluate.py load
            unwrapped.save_pretrained(tmp / "adapter")
            unwrapped.get_base_model().save_pretrained(tmp / "policy", state_dict=state_dict, safe_serialization=True)
        else:
            unwrapped.save_pretrained(tmp / "policy", state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(tmp / "policy")
        (tmp / "policy" / data.TRAIN_SETTINGS).write_text(json.dumps(data.train_settings(args), indent=2))
        state = {"step": step, **data_state, "args": dataclasses.asdict(args)}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(out.glob("checkpoint-[0-9]*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


# Settings that change no number of a run: a --resume may change them freely. Every other field
# of Args (and of the judge's, less its connection settings) is compared with the checkpoint's.
RESUME_FREE = {"max_steps", "epochs", "micro_batch_size", "vision_once", "gradient_checkpointing",
               "skip_bad_rows", "val_dataset", "val_split", "val_every", "val_before_train", "val_limit",
               "gpu_memory_utilization", "tensor_parallel_size", "vllm_sleep", "enforce_eager", "output_dir",
               "log_every", "sample_every", "save_every", "resume", "overwrite", "resume_with_changes",
               "report_to"}
JUDGE_RESUME_FREE = {"base_urls", "api_key_env", "max_concurrency", "timeout_s", "max_retries", "backoff_base_s",
                     "backoff_max_s", "min_usable_fraction", "max_failure_rate", "failure_window",
                     "guard_min_responses", "health_check", "vllm_gpu_memory_utilization", "vllm_enforce_eager"}
RUN_FILES = ("metrics.jsonl", "val", "tensorboard", "rewards.png")  # what a run writes besides checkpoints


def changed_settings(saved: dict, args: Args) -> list[str]:
    """'name: saved -> now' for every setting outside RESUME_FREE that differs from a checkpoint's."""
    now = json.loads(json.dumps(dataclasses.asdict(args), default=str))  # tuples -> lists, as saved
    diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items()
             if k not in RESUME_FREE and k != "judge" and saved.get(k) != v]
    judge_saved = saved.get("judge", {})
    diffs += [f"judge.{k}: {judge_saved.get(k)!r} -> {v!r}" for k, v in now["judge"].items()
              if k not in JUDGE_RESUME_FREE and judge_saved.get(k) != v]
    return diffs


def claim_output_dir(accelerator, args: Args) -> tuple[object, Path | None]:
    """One run per output folder, and every log holding each step once. Returns (the folder's
    lock, held by the main process only; the checkpoint to resume from or None).

    1. the main process locks the folder (data.lock_folder): a second live run stops here;
    2. without --resume, a folder that holds a run (checkpoints or logs) is refused, unless
       --overwrite, which deletes that run's checkpoints and logs;
    3. with --resume, the newest checkpoint; settings that change the maths are compared with
       its own (stop unless --resume_with_changes); the logs are cut back to its step: rows of
       metrics.jsonl and val/step-N.jsonl files past it (the killed run's extra steps) are
       dropped, so that the resumed run logs each step once, in order. TensorBoard's events are
       purged when the Logger opens (purge_step). No checkpoint: a fresh start, logs cleared.
    """
    out = Path(args.output_dir)
    ckpt = latest_checkpoint(out) if args.resume else None

    def check_and_trim():
        lock = data.lock_folder(out)
        held = [p.name for p in sorted(out.glob("checkpoint-[0-9]*"))] + [f for f in RUN_FILES if (out / f).exists()]
        if not args.resume and held and not args.overwrite:
            raise FileExistsError(f"{out} holds a run ({', '.join(held)}): pass --resume to continue it, "
                                  f"--overwrite to delete it and start afresh, or choose another --output_dir")
        if ckpt is None:  # a fresh start: nothing of an earlier run may stay
            if args.resume:
                print(f"--resume: no checkpoint in {out}, starting fresh", flush=True)
            for p in [*out.glob("checkpoint-[0-9]*"), *out.glob(".checkpoint-*.tmp"), *(out / f for f in RUN_FILES)]:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            return lock
        state = json.loads((ckpt / "state.json").read_text())
        diffs = changed_settings(state["args"], args) if "args" in state else []
        if diffs and not args.resume_with_changes:
            raise ValueError(f"--resume: these settings differ from {ckpt}'s and change the run's maths:\n  "
                             + "\n  ".join(diffs) + "\nrestore them, or pass --resume_with_changes to go on")
        step = state["step"]
        rows = data.read_jsonl(out / "metrics.jsonl")
        data.write_jsonl(out / "metrics.jsonl", [r for r in rows if r["step"] <= step])
        for f in (out / "val").glob("step-*.jsonl"):
            if int(f.stem.split("-")[1]) > step:
                f.unlink()
        return lock

    lock = run_together(accelerator, check_and_trim) if accelerator.is_main_process else None
    if not accelerator.is_main_process:
        run_together(accelerator, lambda: None)  # learns whether the main process refused
    return lock, ckpt


class Logger:
    """stdout + metrics.jsonl (+ TensorBoard or wandb), main process only."""

    def __init__(self, args: Args, accelerator, run_config: dict, start_step: int = 0):
        self.main = accelerator.is_main_process
        self.tb = self.wandb = None
        if not self.main:
            return
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")
        if args.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events past a resumed checkpoint's step (a killed run's) are dropped
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
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
        keys = [k for k in metrics if k.startswith(("reward/", "val/"))] + ["train/loss", "train/entropy",
                                                                            "rollout/vllm_kl", "perf/step_s"]
        print(f"step {step:>5} " + " ".join(f"{k.split('/', 1)[1] if k.startswith('reward/') else k}="
                                           f"{metrics[k]:.3f}" for k in keys if k in metrics), flush=True)

    def close(self, out: Path) -> None:
        """End of training: rewards.png (every reward term and validation metric over steps) and a
        summary line (mean total reward of the first vs the last 5 steps, median step time)."""
        if not self.main:
            return
        self.jsonl.close()
        logged = data.read_jsonl(out / "metrics.jsonl")
        rows = [r for r in logged if "reward/total" in r]  # training steps (not step-0 validation)
        if not rows:
            return
        plot_metrics(logged, out / "rewards.png")  # validation from step 0 on
        first, last = rows[:5], rows[-5:]
        mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        step_s = sorted(r["perf/step_s"] for r in rows)[len(rows) // 2]
        print(f"summary: {len(rows)} steps, reward/total {mean(first, 'reward/total'):.3f} (first {len(first)}) -> "
              f"{mean(last, 'reward/total'):.3f} (last {len(last)}), median step {step_s:.1f} s; "
              f"plot: {out / 'rewards.png'}", flush=True)

    def samples(self, step: int, rows: list[dict]) -> None:
        """A markdown table of sample completions with every reward term (columns from the rows)."""
        if not self.main or not rows:
            return
        cols = [c for c in rows[0] if c != "response"]
        table = ("| " + " | ".join(cols) + " | response |\n" + "|---" * (len(cols) + 1) + "|\n" + "\n".join(
            "| " + " | ".join(f"{r[c]:.2f}" for c in cols) + f" | {r['response'][:300]!r} |" for r in rows))
        if self.tb:
            self.tb.add_text("samples", table, step)
        if self.wandb:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])}, step=step)
        print(f"--- samples at step {step}\n{table}", flush=True)


def plot_metrics(rows: list[dict], path: Path):
    """One panel per logged reward term (reward/*) and validation metric (val/*, from step 0 on)
    over steps; returns the matplotlib Figure it saved."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    keys = sorted({k for r in rows for k in r if k.startswith(("reward/", "val/")) and k != "val/n"})
    fig = Figure(figsize=(3 * len(keys), 2.6))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), marker=".")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


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
# 12. main: setup helpers, then the loop
# =============================================================================================
def build_policy(args: Args, accelerator, total_steps: int):
    """Processor, policy (float32 master weights; frozen vision tower or LoRA adapters on request,
    a LoRA base in bf16 under bf16 mixed precision),
    the reference for the KL term if it is on, AdamW over the trainable parameters and the
    warm-up-then-constant schedule, prepared by accelerate."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, get_constant_schedule_with_warmup

    # float32 master weights: an AdamW update at lr 1e-6 is far below bf16's resolution and would
    # round away. bf16 compute comes from accelerate's mixed_precision (configs/*.yaml).
    processor = AutoProcessor.from_pretrained(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    # Under LoRA the base weights are frozen and need no float32 master copy: with bf16 mixed
    # precision they load in bf16 (half the memory); PEFT keeps the adapters in float32.
    lora_bf16 = args.lora_r > 0 and accelerator.mixed_precision == "bf16"
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16 if lora_bf16 else torch.float32)
    if args.gradient_checkpointing if args.gradient_checkpointing is not None else torch.cuda.is_available():
        # every module that supports it (the language model and the vision blocks); non-reentrant:
        # works when the inputs need no gradient (frozen embeddings under LoRA)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = freeze_and_adapt(model, args)
    ref_model = None
    if args.kl_coef > 0 and args.lora_r:  # the base model is the policy with its adapters off
        ref_model = AdapterOff(model)
    elif args.kl_coef > 0:  # no reference model at all when KL is off (official default)
        ref_model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
        ref_model.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps(args, total_steps))
    configure_deepspeed(accelerator, args)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if isinstance(ref_model, torch.nn.Module):
        ref_model = ref_model.to(accelerator.device)
    return processor, model, ref_model, optimizer, scheduler


def freeze_and_adapt(model, args: Args):
    """--freeze_vision_tower: no gradient for the vision encoder (and the merger with
    --freeze_merger). --lora_r: LoRA adapters (PEFT) on the language model's linear layers; every
    base weight is then frozen."""
    if args.freeze_vision_tower:
        for name, p in model.named_parameters():
            if ".visual." in f".{name}" and (args.freeze_merger or ".merger." not in name):
                p.requires_grad_(False)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        # a full-match regex: the named linear layers inside the language model only
        targets = rf".*language_model\..*\.({'|'.join(args.lora_target_modules)})"
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                 lora_dropout=args.lora_dropout, target_modules=targets))
    return model


class AdapterOff:
    """Calls the LoRA policy with its adapters switched off, i.e. the base model: the KL reference
    without a second copy of the weights."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        with self.model.disable_adapter():
            return self.model(**inputs)

    def get_image_features(self, *args, **kwargs):  # --vision_once
        with self.model.disable_adapter():
            return self.model.get_image_features(*args, **kwargs)


def policy_weights(model, changed_only: bool = False) -> dict[str, torch.Tensor]:
    """The policy's weights under their Hugging Face names, LoRA adapters merged in
    (W + alpha/r * B A): what vLLM loads and what a checkpoint's policy/ folder holds.
    changed_only: just the weights training can change (trainable ones; under LoRA the merged
    target layers), the base weights vLLM already holds being left out."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        if changed_only:
            return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        return {n: t.detach() for n, t in model.state_dict().items()}
    base, out = model.get_base_model(), {}
    merged = {f"{name}.base_layer.weight": (f"{name}.weight", m) for name, m in base.named_modules()
              if isinstance(m, LoraLayer)}
    for name, tensor in base.state_dict().items():
        if name in merged:
            hf_name, layer = merged[name]
            out[hf_name] = tensor + layer.get_delta_weight("default").detach()
        elif ".lora_" not in name and ".base_layer." not in name and not changed_only:
            out[name] = tensor
        elif ".base_layer." in name and not changed_only:  # the bias of a LoRA layer
            out[name.replace(".base_layer.", ".")] = tensor
    return out


def check_sizes(args: Args, num_rows: int, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps), failing loudly on sizes that cannot work."""
    if args.prompts_per_step % world:
        raise ValueError(f"prompts_per_step={args.prompts_per_step} must be divisible by the number "
                         f"of processes ({world})")
    if args.tensor_parallel_size > 1 and world > 1:
        raise ValueError("tensor_parallel_size > 1 with several training processes is not supported: every "
                         "rank of a vLLM tensor-parallel group would need identical requests")
    steps_per_epoch = num_rows // args.prompts_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"dataset has {num_rows} rows, fewer than prompts_per_step={args.prompts_per_step}")
    return steps_per_epoch, args.max_steps or args.epochs * steps_per_epoch


def warmup_steps(args: Args, total_steps: int) -> int:
    """Linear warm-up length in optimizer steps: int(warmup_ratio x optimizer steps), rounded down
    as the official trainer does (13 of the paper's 275 steps)."""
    return int(args.warmup_ratio * total_steps * args.ppo_epochs)


def build_samples(processor, prompts, images, rows, completion_ids, vllm_logps, advantages, args: Args) -> list[dict]:
    """Training samples: the processor's prompt ids (image tokens expanded) + vLLM's completion ids.
    Raises ValueError naming the row when a prompt exceeds max_prompt_length (never truncated)."""
    G, eos = args.group_size, processor.tokenizer.eos_token_id
    samples = []
    for p, (prompt, imgs, row) in enumerate(zip(prompts, images, rows)):
        enc = processor(text=[prompt], images=imgs, return_tensors="pt")
        prompt_ids = enc["input_ids"][0].tolist()
        if len(prompt_ids) > args.max_prompt_length:
            raise ValueError(f"{data.row_name(row)}: prompt has {len(prompt_ids)} tokens, more than "
                             f"max_prompt_length={args.max_prompt_length} (prompts with image tokens are never "
                             "truncated; lower max_pixels or raise the limit)")
        for i in range(p * G, (p + 1) * G):
            empty = not completion_ids[i]  # an empty completion trains on one EOS token (log-prob unknown: 0)
            samples.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids[i] or [eos],
                            "mm_token_type_ids": enc["mm_token_type_ids"][0].tolist(),
                            "vllm_logps": vllm_logps[i] if not empty else [0.0],
                            "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"],
                            "advantage": float(advantages[i])})
    return samples


def step_metrics(accelerator, terms: dict, rewards, advantages, failed, has_facts, completion_ids,
                 train_stats: dict, lr: float, times: dict, args: Args) -> dict[str, float]:
    """Every logged number of a step (README glossary), averaged over processes."""
    G = args.group_size
    lengths = torch.tensor([float(len(c)) for c in completion_ids])
    judged = has_facts & ~failed
    local = {f"reward/{name}": r.mean() for name, r in terms.items()}
    if "visual" in terms:  # rows with facts whose judgement succeeded
        local["reward/visual"] = terms["visual"][judged].mean() if judged.any() else torch.tensor(0.0)
        local["judge/failed_responses"] = failed.float().mean()
    local.update({
        "reward/total": rewards.mean(),
        "adv/mean": advantages.mean(), "adv/std": advantages.std(), "adv/abs_max": advantages.abs().max(),
        "adv/zero_spread_groups": (rewards.view(-1, G).std(1) < 1e-8).float().mean() if G > 1 else torch.tensor(1.0),
        "completion/length_mean": lengths.mean(), "completion/length_max": lengths.max(),
        "completion/truncated": (lengths >= args.max_response_length).float().mean(),
        "rollout/vllm_logp_abs_diff": torch.tensor(train_stats.pop("vllm_logp_abs_diff")),
        "rollout/vllm_kl": torch.tensor(train_stats.pop("vllm_kl")),
        **{f"train/{k}": torch.tensor(v) for k, v in train_stats.items()},
        "train/lr": torch.tensor(lr), **{f"perf/{k}": torch.tensor(v) for k, v in times.items()},
    })
    stacked = torch.stack([v.float() for v in local.values()]).to(accelerator.device)
    reduced = accelerator.reduce(stacked, reduction="mean")  # PLUMBING: mean over processes
    return {k: float(v) for k, v in zip(local, reduced)}


def sample_table(terms: dict, rewards, responses: list[str], G: int) -> list[dict]:
    """Up to 8 responses (two per group) with their total reward and every reward term."""
    picks = list(range(0, len(responses), max(1, G // 2)))[:8]
    return [{"reward": float(rewards[i]), **{name: float(r[i]) for name, r in terms.items()},
             "response": responses[i]} for i in picks]


def load_data(accelerator, args: Args) -> tuple[list[dict], list[dict]]:
    """Training and validation rows, every one checked (section 7); prints how many gold answers
    the two --gold_parse policies read differently (deviation 7)."""
    rows = load_checked_rows(accelerator, args.dataset, args.split, args, "training",
                             require_facts="visual" in reward_table(args))
    val_rows = (load_checked_rows(accelerator, args.val_dataset, args.val_split, args, "validation",
                                  require_facts=False, limit=args.val_limit) if args.val_dataset else [])
    if accelerator.is_main_process and args.task == "geometry":
        print(gold_parse_report([str(r["answer"]) for r in rows], args.dataset)[1], flush=True)
    return rows, val_rows


def resume_step(accelerator, ckpt: Path | None) -> int:
    """Load a checkpoint's accelerate state (weights, optimizer, scheduler, RNG per rank); return
    its step, 0 when there is none."""
    if ckpt is None:
        return 0
    accelerator.load_state(str(ckpt / "accelerate"))
    step = json.loads((ckpt / "state.json").read_text())["step"]
    accelerator.print(f"resumed from {ckpt} at step {step}")
    return step


def run_together(accelerator, fn, *args, **kwargs):
    """fn(*args, **kwargs) on every process; if it raises on any process, every process raises
    (a rank that raised alone would leave the others blocked in the next collective)."""
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # re-raised below, on every rank
        error = e
    fail_together(accelerator, error)
    return result


def score_batch(local_responses: list[str], local_rows: list[dict], args: Args, judge, pool):
    """Reward terms of this process's B*G responses as tensors (table order), the judge-failure
    mask and which responses have facts. A failed judgement gets its group's mean r_v (deviation 1)."""
    G = args.group_size
    response_rows = [r for r in local_rows for _ in range(G)]  # group g of prompt b at b*G + g
    raw = score_responses(local_responses, response_rows, args, judge, pool)
    terms = {name: torch.tensor(v, dtype=torch.float32) for name, v in raw.items() if name != "visual"}
    failed = torch.zeros(len(local_responses), dtype=torch.bool)
    if "visual" in raw:
        terms["visual"], failed = impute_failed_judgements(raw["visual"], G)
    has_facts = torch.tensor([has_annotations(r.get("visual_key_info")) for r in response_rows])
    return {name: terms[name] for name in raw}, failed, has_facts


def main(args: Args) -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # step_scheduler_with_optimizer=False: accelerate would otherwise step the LR schedule once
    # per process on every call (8x too fast on 8 GPUs).
    accelerator = Accelerator(step_scheduler_with_optimizer=False)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(args.seed + rank)  # PLUMBING: per-rank seed offset
    lock, checkpoint = claim_output_dir(accelerator, args)  # PLUMBING: one run per folder
    args.model = run_together(accelerator, data.check_source, args.model)  # a typo fails in seconds
    rows, val_rows = load_data(accelerator, args)
    steps_per_epoch, total_steps = check_sizes(args, len(rows), world)
    local_B, G = args.prompts_per_step // world, args.group_size
    weights = {name: w for name, (w, _) in reward_table(args).items()}
    # the judge before the models: build_judge health-checks it, so a dead URL fails in seconds
    judge = build_judge(args.judge) if "visual" in weights else None
    processor, model, ref_model, optimizer, scheduler = build_policy(args, accelerator, total_steps)
    tokenizer, banned_ids = processor.tokenizer, vision_token_ids(processor.tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = Path(args.output_dir)
    start_step = resume_step(accelerator, checkpoint)
    llm = build_vllm(args, rank, world, max_images=max(len(r["images"]) for r in rows + val_rows))
    if start_step > 0:
        sync_weights_to_vllm(accelerator, model, llm, changed_only=False)  # PLUMBING: it loaded the base model
    pool = ThreadPoolExecutor(max_workers=1)  # the judge's thread
    logger = Logger(args, accelerator, run_config(args), start_step)
    run_val = lambda s: validate(llm, judge, pool, processor, val_rows, args, accelerator, s, banned_ids)  # noqa: E731
    if val_rows and args.val_before_train and start_step == 0:
        logger.log(0, run_val(0))

    for step in range(start_step, total_steps):
        t0 = time.time()
        # 1) this process's B/P prompts
        idx = batch_indices(len(rows), step, args.prompts_per_step, args.seed)
        local_rows = [rows[i] for i in idx[rank * local_B:(rank + 1) * local_B]]
        local_images = [data.row_images(r, args.min_pixels, args.max_pixels) for r in local_rows]
        local_rows = [with_frame(r, im) for r, im in zip(local_rows, local_images)]  # PLUMBING: gold box scale
        local_prompts = [data.row_prompt(processor, r, len(im), args.instruction)
                         for r, im in zip(local_rows, local_images)]

        # 2) rollouts: G responses per prompt, groups contiguous, with vLLM's log-prob per token
        local_completions, local_vllm_logps = generate_rollouts(
            llm, local_prompts, local_images, args, f"s{step}-r{rank}", banned_ids, n=G,
            seed=rollout_seed(args, step, rank))
        if args.vllm_sleep:
            llm.sleep(level=2)  # PLUMBING: drop KV cache and weights (the sync rewrites them)
        local_responses = tokenizer.batch_decode(local_completions, skip_special_tokens=True)
        t_gen = time.time() - t0

        # 3) reward terms -> R -> group advantages
        local_terms, local_failed, local_has_facts = run_together(
            accelerator, score_batch, local_responses, local_rows, args, judge, pool)
        local_rewards = mix_rewards(local_terms, weights)  # ALGO: R, (B*G,)
        local_advantages = group_advantages(local_rewards, G, args.adv_eps)  # ALGO: A, (B*G,)
        t_reward = time.time() - t0 - t_gen

        # 4) training samples: processor prompt ids + vLLM completion ids
        samples = run_together(accelerator, build_samples, processor, local_prompts, local_images, local_rows,
                               local_completions, local_vllm_logps, local_advantages, args)

        # 5) policy update: micro-batches, one token-mean over all processes, AdamW
        model.train()
        train_stats = train_on_batch(model, ref_model, optimizer, scheduler, accelerator, samples, args, pad_id,
                                     banned_ids)
        t_train = time.time() - t0 - t_gen - t_reward

        # 6) new weights into vLLM
        if args.vllm_sleep:
            llm.wake_up()  # PLUMBING: memory back on the GPU; the sleep forgot every weight
        sync_weights_to_vllm(accelerator, model, llm, changed_only=not args.vllm_sleep)  # PLUMBING

        # 7) validation, logging, sample table
        done = step + 1 == total_steps
        times = {"generate_s": t_gen, "reward_s": t_reward, "train_s": t_train, "step_s": time.time() - t0}
        metrics = step_metrics(accelerator, local_terms, local_rewards, local_advantages, local_failed,
                               local_has_facts, local_completions, train_stats, scheduler.get_last_lr()[0], times,
                               args)
        if judge is not None:
            metrics.update(judge.stats())
        if val_rows and ((step + 1) % args.val_every == 0 or done):
            metrics.update(run_val(step + 1))
        if (step + 1) % args.log_every == 0 or done:
            logger.log(step + 1, metrics)
        if args.sample_every and (step + 1) % args.sample_every == 0:
            logger.samples(step + 1, sample_table(local_terms, local_rewards, local_responses, G))

        # 8) checkpoint
        if done or (args.save_every and (step + 1) % args.save_every == 0):
            save_checkpoint(accelerator, model, processor, out, step + 1, args,
                            {"epoch": (step + 1) // steps_per_epoch, "rows": len(rows)})

    pool.shutdown()
    if judge is not None:
        judge.close()
    logger.close(out)
    accelerator.print(f"done: {total_steps} steps, checkpoints in {out}")


if __name__ == "__main__":
    data.quiet_libraries()
    main(tyro.cli(Args))
