"""Benchmark: one GRPO step of train_grpo.py vs TRL's GRPOTrainer, same model, data and settings.

What is compared
    The wall-clock time of one steady-state GRPO step (rollouts, the four rewards, one optimizer
    update) on CPU, in one run of this script:
      ours  `train_grpo.py` itself, started as a subprocess: its own `perf/step_s`, `perf/generate_s`
            and `perf/reward_s` from <output_dir>/metrics.jsonl (update + rest = the remainder);
      TRL   TRL 1.16's `GRPOTrainer` in this process, each optimizer step timed by a TrainerCallback.
    Both: the tiny Qwen2.5-VL (demo/tiny_model.py, warm-started) and the demo data
    (demo/demo_data.py, 256 rows), 16 prompts x 8 samples x at most 96 tokens, micro-batch 32,
    rewards 0.9 r_acc + 0.1 r_fmt + 0.7 r_v (lexical judge) + r_p, computed by our own reward
    functions (train_grpo.py, judge.py) in both. Steady state = median of steps 3..8 (the first two
    warm up). Goal: ours <= 0.5x TRL's step time. The script prints a table and, last, the ratio;
    it exits 0 whatever the ratio (a measurement, not a test), non-zero only if a side fails to run.

Reproduce (about 3 minutes on an idle 2-core machine, each side ~75 s including its start-up; the
first run also builds the tiny model + demo data into <tmp>/perception_r1_bench, about 2 minutes):

    pip install -r requirements-bench.txt          # trl==1.16.0, benchmark-only
    .venv/bin/python benchmarks/bench_grpo_step.py
    .venv/bin/python benchmarks/bench_grpo_step.py --model tiny_model --dataset demo_data/train.jsonl  # reuse
    .venv/bin/python benchmarks/bench_grpo_step.py --threads 1      # on a machine other jobs share

Measured (2 CPUs, no other job running, 2 threads, steps 3..8):
                        step s   generate s   rewards + prep s   update + rest s   tokens/s
    ours                 4.91       2.39           0.24               2.32           2297
    TRL 1.16             6.26       2.20           0.49               3.49           1805
    ratio ours/TRL step time: 0.78 -- the goal (<= 0.50) is NOT met on this setup. With the
    567k-parameter tiny model every step is dominated by per-call overhead, not arithmetic: HF
    generate with one padded batch of 128 is as fast as vLLM's CPU backend here (2.2 vs 2.4 s,
    both ~88 tokens per completion), and our edge comes from the update (one processor call per
    prompt instead of per sample, no 4x data-loader refetch) and the reward phase.

Settings matched (TRL name = ours)
    model, dtype float32 for policy and sampling, no gradient checkpointing; data rows and their
    prompts (data.build_messages: the problem + " " + data.INSTRUCTION, image first, same chat
    template); images resized once by data.row_images to the Qwen2.5-VL grid with min/max pixels
    3,136 / 50,176 (64 image tokens), the processor given the same bounds; prompts never truncated
    (TRL 1.16 has no prompt truncation; ours: --max_prompt_length 1024 only checks);
    num_generations = group_size = 8; 16 prompts per optimizer step (generation_batch_size =
    per_device_train_batch_size 32 x gradient_accumulation_steps 4 = 128 completions);
    max_completion_length = max_response_length = 96; temperature 1.0, top_p 1.0, no top-k;
    loss_type "dapo" = token-mean over the whole accumulated batch; epsilon 0.2 / epsilon_high 0.3
    = clip_eps_low / clip_eps_high; beta 0 = kl_coef 0 (no reference model in either);
    num_iterations 1 and steps_per_generation = gradient_accumulation_steps = ppo_epochs 1
    (fully on-policy: neither computes old log-probs); scale_rewards "group" = group-normalised
    advantages; reward_weights [0.9, 0.1, 0.7, 1.0]; AdamW lr 1e-6, weight decay 1e-3, constant
    schedule without warm-up, gradient clip 1.0; seed 1; no checkpoints, no sample tables.

Settings that differ (cannot be matched)
    1. Generation: ours samples with vLLM (CPU backend, colocated, weights pushed in after every
       update); TRL with Hugging Face `generate` (use_vllm=False): TRL's vLLM colocate mode does
       not run on CPU. On a GPU with a real model this is where vLLM pays off; with the tiny model
       on CPU the two generate equally fast (see Measured).
    2. HF generate runs the 128 sequences as one padded batch until all stop or reach 96 tokens;
       vLLM stops each sequence at its own EOS. Completion lengths also differ by sampling (other
       random streams): the table prints the mean completion length of each side.
    3. Ours bans the vision special tokens in sampling (logit bias) and in the training softmax,
       and applies the dual clip (c = 3) to negative advantages; TRL does neither. Both are
       element-wise and cost nothing measurable.
    4. Ours scores r_v in a worker thread while the cheap rewards run; TRL calls the four reward
       functions one after the other. With the lexical judge both take milliseconds.
    5. Advantage eps: ours (std + 1e-6), TRL (std + 1e-4). No effect on time.
    6. TRL's data loader fetches the 16 prompts x 8 repeats once per accumulation step (4 x 128 rows,
       images decoded each time) and runs the processor on all 128 prompts; ours resizes 16 rows'
       images and runs the processor on 16 prompts. Part of each design, so part of its step time.

Threads and a busy machine
    Both sides run with the same number of torch/OpenMP threads (`--threads`, default torch's:
    one per core). When other jobs hold the cores, OpenMP threads spin-wait on each other and
    every small operation slows down many-fold; TRL's step is thousands of small operations
    (HF generate decodes token by token), so a busy machine inflates TRL's time far more than
    ours and the ratio comes out flattering. Measured on this 2-core machine while a test suite
    ran beside it: 4 prompts x 4 x 32 tokens gave ours/TRL 0.11 with 2 threads (load 4) but 1.06
    with 1 thread (load 2.4). The script prints the 1-minute load average around each side and
    warns when it exceeds the benchmark's own threads by 0.75 or more (another busy core); on a
    shared machine use `--threads 1`.

Timing scope
    Ours: `perf/step_s` covers data, rollouts, rewards, update and the weight push
    into vLLM, not the logging line. TRL's step is the interval between consecutive `on_step_end`
    callbacks (data loading, rollouts, rewards, 4 micro-batches, optimizer, logging); the
    `on_step_begin` -> `on_step_end` time (without the data loader's prefetch) is printed too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402


@dataclasses.dataclass
class Args:
    model: str | None = None
    """tiny Qwen2.5-VL folder (None: build one with demo/tiny_model.py into `cache_dir`, warm-started
    100 steps on the demo data, as `make demo` does)"""
    dataset: str | None = None
    """training rows, .jsonl (None: build 256 demo rows with demo/demo_data.py into `cache_dir`)"""
    cache_dir: str = str(Path(tempfile.gettempdir()) / "perception_r1_bench")
    """where the built model and data are kept and reused"""
    prompts_per_step: int = 16
    """B, prompts per optimizer step (issue: 16)"""
    group_size: int = 8
    """G, samples per prompt (issue: 8)"""
    max_response_length: int = 96
    """tokens per sample at most (issue: 96)"""
    micro_batch_size: int = 32
    """samples per forward/backward pass (issue: 32); B*G must be a multiple of it"""
    steps: int = 8
    """optimizer steps per side (issue: 8)"""
    warmup_steps: int = 2
    """first steps left out of the median (issue: 2 -> median of steps 3..8)"""
    min_pixels: int = 3_136
    """smallest image size in pixels, both sides (official script: 3,136)"""
    max_pixels: int = 50_176
    """largest image size in pixels, both sides in pixels for both sides (50,176 = 224 x 224 -> 64 image tokens)"""
    max_prompt_length: int = 1024
    """ours only: prompts longer than this fail (TRL never truncates either)"""
    seed: int = 1
    """run seed of both sides"""
    threads: int | None = None
    """torch/OpenMP threads of both sides (None: torch's default, one per core). On a machine
    where other jobs take the cores, OpenMP threads spin-wait for each other and tiny operations
    get many times slower; 1 avoids that and keeps the comparison fair there"""
    side: Literal["both", "ours", "trl"] = "both"
    """both | ours | trl (one side only, e.g. to re-measure it)"""
    vision_once: bool = False
    """ours with --vision_once (each prompt's image encoded once per micro-batch; same loss and
    gradients). Off by default: the issue's comparison is the default training path"""
    json: str | None = None
    """also write the results as JSON to this path"""
    keep_runs: bool = False
    """keep the two output folders (printed) instead of deleting them"""

    def __post_init__(self):
        n = self.prompts_per_step * self.group_size
        if n % self.micro_batch_size:
            raise ValueError(f"prompts_per_step x group_size = {n} must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size}): TRL's generation batch is micro-batch x accumulation steps")
        if self.steps <= self.warmup_steps:
            raise ValueError(f"steps ({self.steps}) must exceed warmup_steps ({self.warmup_steps})")


# ---------------------------------------------------------------------------------------------
# The tiny model and the demo data (built once, reused)
# ---------------------------------------------------------------------------------------------
def ensure_assets(args: Args) -> tuple[str, str]:
    """(model folder, dataset file): the given ones, or the demo ones built into cache_dir."""
    cache = Path(args.cache_dir)
    dataset = args.dataset or str(cache / "demo_data" / "train.jsonl")
    model = args.model or str(cache / "tiny_model")
    if not Path(dataset).exists():
        if args.dataset:
            raise FileNotFoundError(dataset)
        print(f"building demo data -> {Path(dataset).parent}", flush=True)
        subprocess.run([sys.executable, "-m", "demo.demo_data", "--output_dir", str(Path(dataset).parent),
                        "--num_train", "256", "--num_test", "0", "--no_parquet"], cwd=REPO, check=True)
    if not (Path(model) / "config.json").exists():
        if args.model:
            raise FileNotFoundError(f"{model}/config.json")
        print(f"building the tiny model (warm start 100 steps) -> {model}", flush=True)
        subprocess.run([sys.executable, "-m", "demo.tiny_model", "--output_dir", model, "--warm_start_data",
                        dataset, "--warm_start_steps", "100"], cwd=REPO, check=True)
    return model, dataset


def median_after(values: list[float], skip: int) -> float:
    """Steady state: the median of the values after the first `skip` ones."""
    return statistics.median(values[skip:])


# ---------------------------------------------------------------------------------------------
# Ours: train_grpo.py as a subprocess, its own perf/* metrics
# ---------------------------------------------------------------------------------------------
def run_ours(args: Args, model: str, dataset: str, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "train_grpo.py"), "--model", model, "--dataset", dataset,
           "--prompts_per_step", str(args.prompts_per_step), "--group_size", str(args.group_size),
           "--max_response_length", str(args.max_response_length), "--micro_batch_size", str(args.micro_batch_size),
           "--max_steps", str(args.steps), "--judge.backend", "lexical", "--dtype", "float32",
           "--min_pixels", str(args.min_pixels), "--max_pixels", str(args.max_pixels),
           "--max_prompt_length", str(args.max_prompt_length), "--learning_rate", "1e-6", "--warmup_ratio", "0",
           "--seed", str(args.seed), "--save_every", "0", "--sample_every", "0", "--report_to", "none",
           "--output_dir", str(out)] + (["--vision_once"] if args.vision_once else [])
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch reads it at start-up
    print("ours: " + " ".join(cmd[1:]), flush=True)
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"train_grpo.py failed (exit {proc.returncode}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-30:]))
    rows = [r for r in data.read_jsonl(out / "metrics.jsonl") if "perf/step_s" in r]
    if len(rows) != args.steps:
        raise RuntimeError(f"{out}/metrics.jsonl: {len(rows)} steps logged, expected {args.steps}")
    get = lambda key: [r[key] for r in rows]  # noqa: E731
    n = args.prompts_per_step * args.group_size
    step = median_after(get("perf/step_s"), args.warmup_steps)
    length = median_after(get("completion/length_mean"), args.warmup_steps)
    # update + rest = step - generate - rewards: processor, micro-batches, optimizer, weight push into vLLM
    rest = [r["perf/step_s"] - r["perf/generate_s"] - r["perf/reward_s"] for r in rows]
    return {"step_s": step, "generate_s": median_after(get("perf/generate_s"), args.warmup_steps),
            "reward_s": median_after(get("perf/reward_s"), args.warmup_steps),
            "update_s": median_after(rest, args.warmup_steps),
            "completion_length": length, "tokens_per_s": n * length / step,
            "reward_total": statistics.mean(get("reward/total")), "steps_s": get("perf/step_s"),
            "generate_steps_s": get("perf/generate_s"), "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# TRL: GRPOTrainer in this process, the same rewards wrapped in TRL's signature
# ---------------------------------------------------------------------------------------------
def completion_text(completion) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": str | blocks}]."""
    content = completion[0]["content"] if isinstance(completion, list) else completion
    if isinstance(content, str):
        return content
    return "".join(block.get("text") or "" for block in content)


def trl_reward_functions(judge) -> list:
    """Our four reward terms (train_grpo.py, judge.py) as TRL reward functions, in the order of
    reward_weights [0.9, 0.1, 0.7, 1.0]. Extra dataset columns arrive as keyword lists."""
    import train_grpo

    def accuracy(completions, answer, **kw):
        return [train_grpo.accuracy_reward(completion_text(c), str(a)) for c, a in zip(completions, answer)]

    def format(completions, **kw):  # TRL logs each reward under its function's name
        return [train_grpo.format_reward(completion_text(c)) for c in completions]

    def visual(completions, visual_key_info, **kw):
        return judge.score(list(visual_key_info), [completion_text(c) for c in completions])  # None -> NaN in TRL

    def repetition(completions, **kw):
        return [train_grpo.repetition_penalty(completion_text(c)) for c in completions]

    return [accuracy, format, visual, repetition]


def trl_dataset(dataset: str, args: Args):
    """TRL's conversational VLM format: `prompt` (messages with an image placeholder), `images`
    (the resized PIL images), plus the columns the rewards read."""
    from datasets import Dataset

    rows = data.load_rows(dataset)
    records = []
    for row in rows:
        images = data.row_images(row, args.min_pixels, args.max_pixels)
        records.append({"prompt": data.build_messages(row["problem"], len(images), data.INSTRUCTION),
                        "images": images, "answer": str(row["answer"]),
                        "visual_key_info": row.get("visual_key_info") or ""})
    return Dataset.from_list(records)


def run_trl(args: Args, model_dir: str, dataset: str, out: Path) -> dict:
    import warnings

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, PrinterCallback, TrainerCallback

    # TRL warns at import that it was tested with vLLM <= 0.31 (0.32 is installed); its vLLM paths are not used here.
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
    from trl import GRPOConfig, GRPOTrainer

    from judge import JudgeArgs, build_judge

    class StepTimer(TrainerCallback):
        """Wall clock per optimizer step: between consecutive on_step_end (everything), and
        on_step_begin -> on_step_end (without the data loader's prefetch); TRL's logs per step."""

        def __init__(self):
            self.full, self.inner, self.logs = [], [], []

        def on_train_begin(self, *a, **kw):
            self.t_end = time.perf_counter()

        def on_step_begin(self, *a, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, *a, **kw):
            now = time.perf_counter()
            self.full.append(now - self.t_end)
            self.inner.append(now - self.t_begin)
            self.t_end = now

        def on_log(self, *a, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    n = args.prompts_per_step * args.group_size
    config = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, fp16=False, report_to="none", logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=args.seed, max_steps=args.steps,
        gradient_checkpointing=False,  # GRPOConfig's default is True; ours does not checkpoint either
        per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=n // args.micro_batch_size,
        num_generations=args.group_size, max_completion_length=args.max_response_length,
        temperature=1.0, top_p=1.0, top_k=0, use_vllm=False,
        loss_type="dapo", epsilon=0.2, epsilon_high=0.3, beta=0.0, num_iterations=1, scale_rewards="group",
        reward_weights=[0.9, 0.1, 0.7, 1.0],
        learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=1e-3, max_grad_norm=1.0,
        log_completions=False, dataloader_num_workers=0,
    )
    assert config.generation_batch_size == n and config.steps_per_generation == n // args.micro_batch_size
    processor = AutoProcessor.from_pretrained(model_dir, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    judge = build_judge(JudgeArgs(backend="lexical"))
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, processing_class=processor, args=config,
                          train_dataset=trl_dataset(dataset, args), reward_funcs=trl_reward_functions(judge),
                          callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its dict per step would bury the table; the timer keeps the logs

    # Phase times: wrap two of the trainer's methods on this instance (timing only, behaviour unchanged).
    phases = {"generate": [], "rollout": []}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            result = fn(*a, **kw)
            phases[key].append(time.perf_counter() - t)
            return result
        return wrapper
    trainer._generate = timed(trainer._generate, "generate")  # tokenise prompts + HF generate + decode
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "rollout")  # + rewards
    trainer.train()
    judge.close()
    if len(timer.full) != args.steps or len(phases["rollout"]) != args.steps:
        raise RuntimeError(f"TRL ran {len(timer.full)} steps ({len(phases['rollout'])} rollouts), "
                           f"expected {args.steps}")
    k = args.warmup_steps
    step = median_after(timer.full, k)
    length = median_after([log["completions/mean_length"] for log in timer.logs], k)
    # update + rest = step - rollout: data loader, micro-batches, optimizer, logging
    updates = [full - roll for full, roll in zip(timer.full, phases["rollout"])]
    return {"step_s": step, "step_inner_s": median_after(timer.inner, k),
            "generate_s": median_after(phases["generate"], k),
            "reward_s": median_after([r - g for r, g in zip(phases["rollout"], phases["generate"])], k),
            "update_s": median_after(updates, k), "completion_length": length, "tokens_per_s": n * length / step,
            "reward_total": statistics.mean(log["reward"] for log in timer.logs), "steps_s": timer.full,
            "generate_steps_s": phases["generate"], "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def table(results: dict[str, dict]) -> str:
    rows = [("step s (median)", "step_s", "{:.2f}"), ("  generate s", "generate_s", "{:.2f}"),
            ("  rewards + prep s", "reward_s", "{:.2f}"), ("  update + rest s", "update_s", "{:.2f}"),
            ("step s, begin->end", "step_inner_s", "{:.2f}"),
            ("completion tokens (mean)", "completion_length", "{:.1f}"),
            ("completion tokens / s", "tokens_per_s", "{:.0f}"), ("reward/total (mean)", "reward_total", "{:.3f}"),
            ("wall s (incl. start)", "wall_s", "{:.0f}"), ("load average", "load", "{}")]
    sides = list(results)
    lines = [f"{'':<26}" + "".join(f"{s:>12}" for s in sides)]
    for label, key, fmt in rows:
        vals = [fmt.format(results[s][key]) if key in results[s] else "-" for s in sides]
        lines.append(f"{label:<26}" + "".join(f"{v:>12}" for v in vals))
    for s in sides:
        lines.append(f"{s} steps s: " + " ".join(f"{t:.2f}" for t in results[s]["steps_s"]))
    return "\n".join(lines)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> int:
    args = tyro.cli(Args)
    data.quiet_libraries()
    model, dataset = ensure_assets(args)
    work = Path(tempfile.mkdtemp(prefix="bench_grpo_step_"))
    results: dict[str, dict] = {}
    # The 1-minute load average before and after each side: well above our own threads, other jobs
    # compete for the cores and the times (of both sides, unevenly) are not to be trusted.
    for side, run in (("ours", run_ours), ("TRL", run_trl)):
        if args.side in ("both", side.lower()):
            load = os.getloadavg()[0]
            results[side] = run(args, model, dataset, work / side.lower())
            results[side]["load"] = f"{load:.1f} -> {os.getloadavg()[0]:.1f}"
    settings = (f"{args.prompts_per_step} prompts x {args.group_size} samples x {args.max_response_length} tokens, "
                f"micro-batch {args.micro_batch_size}, median of steps {args.warmup_steps + 1}..{args.steps}, "
                f"{args.threads or torch_threads()} threads, {os.cpu_count()} CPUs")
    print(f"\nGRPO step, {settings}\n{table(results)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": dataclasses.asdict(args), "results": results}, indent=2))
    if args.keep_runs:
        print(f"runs kept in {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    # Our own process accounts for about `threads` of the load; 0.75 more means another busy core.
    threads = args.threads or torch_threads()
    busy = [s for s, r in results.items() if max(map(float, r["load"].split(" -> "))) >= threads + 0.75]
    if busy:
        print(f"warning: load average >= {threads + 0.75:.2f} during {', '.join(busy)}: other jobs competed for the "
              "cores; rerun on an idle machine" + ("" if args.threads == 1 else " or with --threads 1"))
    if "ours" in results and "TRL" in results:
        print(f"ratio ours/TRL step time: {results['ours']['step_s'] / results['TRL']['step_s']:.2f} (goal <= 0.50)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
