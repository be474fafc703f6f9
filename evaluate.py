r"""Benchmark evaluation for Perception-R1: generate with vLLM, score answers, score perception,
compare two runs with McNemar's exact test.

What it does
    `eval` (default subcommand): loads benchmark rows (MathVista, MathVerse, MathVision, WeMath,
    Geometry3K or any local file in the training schema) into one internal row type, generates
    one greedy response per row with vLLM using the *training* prompt (data.build_prompt), appends
    each response to `<output_dir>/generations.jsonl` as soon as its batch finishes (a killed run
    resumes and skips done ids), then scores every response (rule-based by default, LLM judge
    optional), measures the perception score r_v where rows carry `visual_key_info`, and writes
    `samples.jsonl`, `summary.json`, `report.md` and `accuracy.png`.
    `score`: re-scores existing responses (one input row -> one output row, order and fields kept).
    `compare RUN_A RUN_B`: accuracy of each run, discordant counts b, c and the exact McNemar p,
    for answers and for perception.

Papers
    Perception-R1 (arXiv 2506.07218) - benchmarks, LLM-judged accuracy, McNemar analysis.
    MathVista (arXiv 2310.02255), MathVerse (arXiv 2403.14624), MATH-Vision (arXiv 2402.14804),
    We-Math (arXiv 2407.01284), Geometry3K / Inter-GPS (arXiv 2105.04165).

Code map (section -> paper -> function)
    1. Loading      -> PAPER.md s.2 columns         -> BENCHMARKS, load_benchmark, to_sample_*
    2. Generation   -> training prompt, greedy      -> generate (vLLM), done_keys (resume)
    3. Scoring      -> rule-based / LLM judge       -> extract_answer, score_answer, llm_score
    4. Perception   -> r_v = mean judged facts       -> perception_scores (judge.build_judge)
    5. Reports      -> per-benchmark accuracy        -> summarize, markdown_report, plot_runs
    6. Re-scoring   -> published responses           -> score_main
    7. Comparison   -> exact two-sided McNemar        -> mcnemar_exact, compare_main

Deviations from the paper
    1. Default scoring is rule-based (extraction + normalisation + math-verify), not the paper's
       Qwen2.5-72B judge; numbers are therefore not comparable with the paper's table. Use
       `--scoring llm` (or `both`) with a served judge to follow the paper; always compare runs
       within one scoring method (PAPER.md s.2).
    2. The paper labels perception-correct by hand (50 MathVista geometry problems); `compare`
       uses r_v >= `--perception_threshold` (default 1.0: every annotated fact stated) as the label.
    3. MathVista is prompted with its `query` (hint + question + choices) followed by our training
       instruction, not MathVista's own answer-format hints alone.
    4. A failed judge verdict (None) is excluded from means and counted, never scored as 0.

Launch
    CPU tiny run:  VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 python evaluate.py eval \
                       --model tiny_model --benchmarks demo --data demo=demo_data/test.jsonl --limit 8 \
                       --dtype float32 --enforce_eager --max_model_len 4096 --output_dir runs/tiny
    1 GPU:         python evaluate.py eval --model ckpt/ --output_dir runs/pr1
    N GPUs:        python evaluate.py eval --model ckpt/ --tensor_parallel_size 4 --output_dir runs/pr1
    Re-score:      python evaluate.py score --benchmark mathvista --data testmini.jsonl \
                       --responses responses.jsonl --output scored.jsonl
    Compare:       python evaluate.py compare runs/base runs/pr1
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import tyro

import data  # shared plumbing: prompt, images, JSONL files (no algorithm)
from data import PAPER_MAX_PIXELS, PAPER_MIN_PIXELS

BENCHMARK_NAMES = ("mathvista", "mathverse", "mathvision", "mathvision_testmini", "wemath", "geometry3k")


# =============================================================================================
# Arguments
# =============================================================================================
@dataclasses.dataclass
class Args:
    """Generate, score and report on benchmarks."""

    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """model folder or Hugging Face id (the paper evaluates Qwen2.5-VL-7B and its GRPO checkpoint)"""
    benchmarks: tuple[str, ...] = ("mathvista", "mathverse", "mathvision", "wemath")
    """benchmarks to run: mathvista (testmini), mathverse (testmini), mathvision (test),
    mathvision_testmini, wemath (testmini), geometry3k (test), or any name given in --data
    (loaded as a local file in the training schema unless the name is a known benchmark).
    Default: the four benchmarks of PAPER.md's results table that we can score."""
    data: tuple[str, ...] = ()
    """overrides of the data source as NAME=SOURCE (a local .jsonl/.json/.parquet or an HF dataset id);
    default sources are the HF ids of PAPER.md s.2"""
    limit: Optional[int] = None
    """rows per benchmark (first N); None = all"""
    output_dir: str = "runs/eval"
    """run folder: generations.jsonl (resumable), samples.jsonl, summary.json, report.md, accuracy.png"""
    skip_missing_images: bool = True
    """skip (and count) rows whose image cannot be found; False = stop with the row's error"""
    # --- generation (vLLM) ---
    max_new_tokens: int = 4096
    """response length limit in tokens (official: 4,096)"""
    temperature: float = 0.0
    """sampling temperature; 0 = greedy (default, the usual benchmark protocol)"""
    top_p: float = 1.0
    """nucleus sampling mass (only used when temperature > 0)"""
    seed: int = 0
    """sampling seed for vLLM"""
    batch_size: int = 64
    """prompts per vLLM call; results are appended after each call (smaller = finer resume)"""
    tensor_parallel_size: int = 1
    """GPUs per vLLM engine (tensor parallel)"""
    dtype: str = "auto"
    """vLLM dtype: auto (bf16 on GPU), float32 on CPU"""
    max_model_len: int = 8192
    """vLLM context length in tokens (official: prompt 4,096 + response 4,096)"""
    gpu_memory_utilization: float = 0.9
    """fraction of GPU memory vLLM may take"""
    enforce_eager: bool = False
    """disable CUDA graphs (needed on CPU)"""
    min_pixels: int = PAPER_MIN_PIXELS
    """image resize lower bound in pixels (official training script: 3,136)"""
    max_pixels: int = PAPER_MAX_PIXELS
    """image resize upper bound in pixels (official training script: 1,806,336)"""
    # --- scoring ---
    scoring: Literal["rule", "llm", "both"] = "rule"
    """answer scoring: rule (extraction + normalisation + math-verify), llm (judge.py's ChatClient:
    extract, then true/false vs gold, as the paper), both (side by side)"""
    judge_backend: Literal["openai", "vllm", "lexical", "none"] = "none"
    """backend for the perception score r_v (judge.build_judge); none = skip r_v; lexical works offline"""
    judge_base_url: str = "http://127.0.0.1:8000/v1"
    """OpenAI-compatible server (ending in /v1) for --scoring llm and for --judge_backend openai
    (start it with e.g. `vllm serve Qwen/Qwen2.5-72B-Instruct`)"""
    judge_model: str = "Qwen/Qwen2.5-72B-Instruct"
    """served model name for --scoring llm (the paper's answer judge: Qwen2.5-72B)"""
    perception_judge_model: str = "Qwen/Qwen2.5-32B-Instruct-AWQ"
    """judge model for r_v (openai: served name; vllm: folder or hub id). Paper: Qwen2.5-32B-Instruct-AWQ"""
    judge_api_key_env: str = "JUDGE_API_KEY"
    """NAME of the environment variable holding the judge server's API key (unset -> "EMPTY")"""
    judge_max_tokens: int = 512
    """max new tokens per judge reply (paper's judge: 512)"""

    def __post_init__(self):
        # fail loudly on settings that would otherwise fail late (after the engine started)
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.tensor_parallel_size < 1:
            raise ValueError("batch_size, max_new_tokens and tensor_parallel_size must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        for item in self.data:
            if "=" not in item:
                raise ValueError(f"--data takes NAME=SOURCE, got {item!r}")


@dataclasses.dataclass
class ScoreArgs:
    """Re-score existing responses without a model."""

    benchmark: str
    """benchmark whose scoring rules apply (mathvista, mathverse, mathvision, wemath, geometry3k, local)"""
    data: str
    """the benchmark rows (local file or HF id) holding the gold answers"""
    responses: str
    """JSONL: each row carries the benchmark's id field (MathVista `pid`, MathVision `id`, ...) and `response`"""
    output: str
    """JSONL written: every input row, in order, with all its fields plus `extracted` and `correct`"""
    split: Optional[str] = None
    """split when --data is an HF id (default: the benchmark's evaluation split)"""


@dataclasses.dataclass
class CompareArgs:
    """Compare two runs (paired by benchmark and id) with McNemar's exact test."""

    run_a: tyro.conf.Positional[str]
    """run folder (or its samples.jsonl) of the first model, e.g. the base model"""
    run_b: tyro.conf.Positional[str]
    """run folder (or its samples.jsonl) of the second model, e.g. Perception-R1"""
    perception_threshold: float = 1.0
    """a response is perception-correct when r_v >= this (1.0: every annotated fact stated)"""
    chart: Optional[str] = None
    """PNG path for a bar chart of both runs per benchmark (None = no chart)"""


# =============================================================================================
# 1. Loading: every benchmark -> one internal row type
# =============================================================================================
@dataclasses.dataclass
class Sample:
    benchmark: str
    id: str  # the benchmark's own id (MathVista pid, MathVision id, ...), as a string
    problem: str  # text given to the model; `<image>` where each image goes
    images: list  # image references (paths, {"bytes","path"} dicts, PIL images); opened lazily
    answer: str  # gold answer (MathVista: option text for MC; MathVision/WeMath/MathVerse: letter)
    choices: Optional[list[str]] = None  # option texts (A, B, ... in order) for multiple choice
    answer_type: Optional[str] = None  # MathVista: text | integer | float | list
    precision: Optional[int] = None  # MathVista: decimals for floats
    visual_key_info: Optional[str] = None  # "<info1>..</info1>..." where annotated
    meta: dict = dataclasses.field(default_factory=dict)  # breakdown keys (task, skills, subject, ...)
    base_dir: Optional[str] = None  # folder for relative image paths


# name -> (HF dataset id, config, split, the row's id field)
BENCHMARKS: dict[str, tuple[str, Optional[str], str, str]] = {
    "mathvista": ("AI4Math/MathVista", None, "testmini", "pid"),
    "mathverse": ("AI4Math/MathVerse", "testmini", "testmini", "sample_index"),
    "mathvision": ("MathLLMs/MathVision", None, "test", "id"),
    "mathvision_testmini": ("MathLLMs/MathVision", None, "testmini", "id"),
    "wemath": ("We-Math/We-Math", None, "testmini", "ID"),
    "geometry3k": ("hiyouga/geometry3k", None, "test", "id"),
    "local": ("", None, "test", "id"),
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _as_list(value: Any) -> Optional[list]:
    """Choices arrive as lists, numpy arrays, "['a', 'b']" strings or None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value or value == "None":
            return None
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
    value = list(value)
    return [str(v) for v in value] or None


def _choices_text(choices: list[str]) -> str:
    return "Choices:\n" + "\n".join(f"({LETTERS[k]}) {c}" for k, c in enumerate(choices))


def _first_image(row: dict, *fields: str) -> list:
    for f in fields:
        v = row.get(f)
        if v is not None and v != "":
            return v if isinstance(v, list) else [v]
    return []


def to_sample_mathvista(row: dict, base: Optional[str]) -> Sample:
    md = row.get("metadata") or {}
    # local slices carry `local_image` for the few rows whose picture is available; HF rows carry
    # `decoded_image` (PIL); `image` is MathVista's relative path (resolved against the file's folder)
    images = _first_image(row, "local_image", "decoded_image", "image")
    return Sample("mathvista", str(row["pid"]), row.get("query") or row["question"], images,
                  str(row["answer"]), _as_list(row.get("choices")), row.get("answer_type"),
                  None if row.get("precision") is None else int(float(row["precision"])),
                  row.get("visual_key_info"),
                  {"task": md.get("task"), "skills": md.get("skills") or [], "question_type": row.get("question_type")},
                  base)


def to_sample_mathverse(row: dict, base: Optional[str]) -> Sample:
    md = row.get("metadata") or {}
    rid = row.get("sample_index", row.get("pid"))
    version = row.get("problem_version") or md.get("problem_version")
    # the question already lists the options for multiple choice (the answer is a letter)
    return Sample("mathverse", str(rid), row["question"],
                  _first_image(row, "image"), str(row["answer"]), _as_list(row.get("choices")), None, None,
                  row.get("visual_key_info"), {"problem_version": version}, base)


def to_sample_mathvision(row: dict, base: Optional[str], name: str = "mathvision") -> Sample:
    question = re.sub(r"<image\d*>", "<image>", row["question"])
    options = _as_list(row.get("options"))
    if options:
        question = question + "\n" + _choices_text(options)
    return Sample(name, str(row["id"]), question, _first_image(row, "decoded_image", "image"),
                  str(row["answer"]), options, None, None, row.get("visual_key_info"),
                  {"subject": row.get("subject"), "level": row.get("level")}, base)


def _split_wemath_options(option: str) -> list[str]:
    """"A. 300, 400;B. 400, 300; E. No correct answer" -> ["300, 400", "400, 300", "No correct answer"]."""
    parts = re.split(r";\s*(?=[A-Z]\.)", option.strip())
    return [re.sub(r"^[A-Z]\.\s*", "", p).strip() for p in parts if p.strip()]


def to_sample_wemath(row: dict, base: Optional[str]) -> Sample:
    options = _split_wemath_options(row.get("option") or "")
    question = row["question"] + ("\n" + _choices_text(options) if options else "")
    return Sample("wemath", str(row["ID"]), question, _first_image(row, "image_path", "image"),
                  str(row["answer"]), options or None, None, None, row.get("visual_key_info"),
                  {"knowledge concept": row.get("knowledge concept")}, base)


def to_sample_training(row: dict, base: Optional[str], name: str = "local") -> Sample:
    """Training schema (data.py): problem (with <image>), answer, images, optional choices,
    visual_key_info. Also Geometry3K (hiyouga/geometry3k and our slice with a single `image`)."""
    choices = _as_list(row.get("choices"))
    problem = row["problem"]
    images = _first_image(row, "images", "image")
    if choices and "Choices" not in problem:
        problem = problem + "\n" + _choices_text(choices)
    rid = row.get("id", row.get("_index"))
    return Sample(name, str(rid), problem, images, str(row["answer"]), choices, None, None,
                  row.get("visual_key_info"), {}, base)


def to_sample(name: str, row: dict, base: Optional[str]) -> Sample:
    kind = name if name in BENCHMARKS else "local"
    if kind == "mathvista":
        return to_sample_mathvista(row, base)
    if kind == "mathverse":
        return to_sample_mathverse(row, base)
    if kind.startswith("mathvision"):
        return to_sample_mathvision(row, base, name)
    if kind == "wemath":
        return to_sample_wemath(row, base)
    return to_sample_training(row, base, name)


def load_benchmark(name: str, source: Optional[str] = None, limit: Optional[int] = None,
                   split: Optional[str] = None) -> list[Sample]:
    """Rows of one benchmark as Samples. `source`: local file or HF id (default: PAPER.md s.2 id)."""
    hf_id, config, default_split, _ = BENCHMARKS.get(name, BENCHMARKS["local"])
    source = source or hf_id
    if not source:
        raise ValueError(f"benchmark '{name}' has no default source: pass --data {name}=FILE")
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        rows = data.load_rows(str(path), limit=limit)
        base = str(path.resolve().parent)
    else:  # PLUMBING: Hugging Face hub (MathVerse needs its config name)
        import datasets

        ds = datasets.load_dataset(source, config, split=split or default_split)
        rows = list(ds.select(range(min(limit, len(ds))))) if limit is not None else list(ds)
        base = None
    samples = []
    for i, row in enumerate(rows):
        try:
            samples.append(to_sample(name, row, base))
        except KeyError as e:
            raise data.RowError(f"{source}: {data.row_name(row, i)}: missing field {e}") from e
    return samples


def sample_images(s: Sample, min_pixels: int, max_pixels: int) -> list:
    """Open and resize a sample's images (raises data.RowError naming the sample)."""
    where = f"{s.benchmark} id={s.id}"
    if not s.images and s.meta.get("problem_version") == "Text Only":
        return []  # MathVerse's text-only version: the whole problem is in the text, no picture
    if not s.images:
        raise data.RowError(f"{where}: no image in the row")
    return [data.resize_image(data.open_image(img, f"{where}: image {k}", s.base_dir), min_pixels, max_pixels)
            for k, img in enumerate(s.images)]


# =============================================================================================
# 2. Generation with vLLM (resumable)
# =============================================================================================
def _images_present(s: Sample) -> bool:
    """Cheap check (no decoding): every image reference is in memory or names an existing file."""
    if not s.images:
        return s.meta.get("problem_version") == "Text Only"
    for img in s.images:
        ref = img.get("path") if isinstance(img, dict) and not img.get("bytes") else img
        if isinstance(ref, (str, os.PathLike)):
            path = Path(ref) if Path(ref).is_absolute() or s.base_dir is None else Path(s.base_dir) / ref
            if not str(ref) or not path.exists():
                return False
        elif ref is None:
            return False
    return True


def done_keys(path: Path) -> set[tuple[str, str]]:
    """(benchmark, id) pairs already generated (a truncated last line is ignored by read_jsonl)."""
    return {(r["benchmark"], str(r["id"])) for r in data.read_jsonl(path)}


def generate(args: Args, samples: list[Sample], out_path: Path) -> dict[str, int]:
    """Generate responses for the samples not yet in `out_path`, appending one row per sample as
    each batch finishes. Returns counts (done before, generated, skipped for missing images)."""
    done = done_keys(out_path)
    todo = [s for s in samples if (s.benchmark, s.id) not in done]
    counts = {"already_done": len(samples) - len(todo), "generated": 0, "skipped_no_image": 0}
    # PLUMBING: drop rows whose image file is absent *before* starting the engine, so a finished
    # run with a few imageless rows does not start vLLM again just to skip them
    missing = [s for s in todo if not _images_present(s)]
    if missing:
        if not args.skip_missing_images:
            sample_images(missing[0], args.min_pixels, args.max_pixels)  # raises, naming the row
        for s in missing:
            print(f"skip: {s.benchmark} id={s.id}: image missing ({str(s.images)[:100]})", file=sys.stderr)
        counts["skipped_no_image"] += len(missing)
        todo = [s for s in todo if _images_present(s)]
    if not todo:
        return counts
    from tqdm import tqdm
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    # PLUMBING: the processor only renders the chat template; vLLM does the image processing on
    # pixels we resized already (same min/max as training, so the same image tokens).
    processor = AutoProcessor.from_pretrained(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    llm = LLM(model=args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
              max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, seed=args.seed,
              gpu_memory_utilization=args.gpu_memory_utilization,
              limit_mm_per_prompt={"image": max(1, max(len(s.images) for s in todo))},
              mm_processor_kwargs={"min_pixels": args.min_pixels, "max_pixels": args.max_pixels})
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p if args.temperature > 0 else 1.0,
                            max_tokens=args.max_new_tokens, seed=args.seed)
    with data.open_for_append(out_path) as fh, tqdm(total=len(todo), desc="generate") as bar:
        for start in range(0, len(todo), args.batch_size):
            batch, inputs = [], []
            for s in todo[start:start + args.batch_size]:
                try:
                    images = sample_images(s, args.min_pixels, args.max_pixels)
                except data.RowError as e:
                    if not args.skip_missing_images:
                        raise
                    counts["skipped_no_image"] += 1
                    print(f"skip: {e}", file=sys.stderr)
                    continue
                # ALGO: the training prompt format, so the evaluated model sees what it was trained on
                prompt = data.build_prompt(processor, s.problem, len(images))
                batch.append((s, prompt))
                inputs.append({"prompt": prompt, **({"multi_modal_data": {"image": images}} if images else {})})
            if inputs:
                outputs = llm.generate(inputs, params, use_tqdm=False)
                for (s, prompt), out in zip(batch, outputs):
                    data.append_jsonl(fh, {"benchmark": s.benchmark, "id": s.id, "prompt": prompt,
                                           "response": out.outputs[0].text,
                                           "finish_reason": out.outputs[0].finish_reason})
                    counts["generated"] += 1
            bar.update(len(todo[start:start + args.batch_size]))
    return counts


# =============================================================================================
# 3. Scoring
# =============================================================================================
def last_boxed(text: str) -> Optional[str]:
    r"""Content of the last \boxed{...} (or \fbox{...}), nested braces allowed; None if absent.

    >>> last_boxed(r"so \boxed{1} no, \boxed{\frac{1}{2}}")
    '\\frac{1}{2}'
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: the response was cut off inside the box


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_ANSWER_PHRASE = re.compile(
    r"(?:final answer|correct answer|answer|correct option|correct choice)\s*(?:is|:|=)?\s*[:：]?\s*"
    r"(\(?[A-Z]\)?(?![a-zA-Z])|[^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(response: str, choices: Optional[list[str]] = None) -> str:
    r"""The final answer text of a response ("" if none).

    Order: the `<answer>` block (DOTALL, unlike the official training regex; PAPER.md s.1) narrows
    the search; inside it the last \boxed{...}; else a phrase "answer is X"/"Answer: X" (last one);
    else a short text taken whole; else the last number. With `choices`, an extraction that
    names no option falls back to `extract_choice`.
    """
    if not response:
        return ""
    ext = _extract_free(response)
    if choices and choice_index(ext, choices) is None:
        # multiple choice: the free extraction named no option; look for a letter or option text
        ext = extract_choice(response, choices) or ext
    return ext


def _extract_free(response: str) -> str:
    blocks = _ANSWER_BLOCK.findall(response)
    region = blocks[-1] if blocks and blocks[-1].strip() else response
    boxed = last_boxed(region)
    if boxed is None and region is not response:
        boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    if region is not response:
        return region.strip()
    phrases = _ANSWER_PHRASE.findall(region)
    if phrases:
        ans = phrases[-1].strip()
        ans = re.split(r"\.(?=\s|$)", ans)[0].strip()  # cut at the sentence end, keep decimals
        return ans.strip(" *$")
    if len(region.strip()) <= 40:
        return region.strip()
    numbers = _NUMBER.findall(region)
    return numbers[-1].replace(",", "") if numbers else region.strip()[-40:]


def extract_choice(response: str, choices: list[str]) -> Optional[str]:
    """For multiple choice when the plain extraction names no option: the last "(B)" / "option B" /
    "answer is B" letter in the response, else the option text mentioned last. None if neither."""
    n = len(choices)
    letter = re.findall(rf"\(([A-{LETTERS[n - 1]}])\)|\b(?:option|choice|letter|answer)\s*(?:is\s*)?:?\s*([A-{LETTERS[n - 1]}])\b",
                        response)
    if letter:
        return "".join(letter[-1])
    low = response.lower()
    pos = [(low.rfind(_clean(c)), k) for k, c in enumerate(choices) if _clean(c)]
    pos = [(p, k) for p, k in pos if p >= 0]
    return choices[max(pos)[1]] if pos else None


def _clean(text: str) -> str:
    """Normalise for exact comparison: strip LaTeX wrappers, spaces, trailing period, case."""
    t = str(text).strip()
    t = re.sub(r"\\text\{([^{}]*)\}|\\mathrm\{([^{}]*)\}", lambda m: m.group(1) or m.group(2) or "", t)
    t = t.replace("\\%", "%").replace("$", "").replace("\\,", "").replace("^\\circ", "").replace("°", "")
    return re.sub(r"\s+", " ", t).strip(" .").lower()


def _to_float(text: str) -> Optional[float]:
    t = _clean(text).replace(",", "").rstrip("%")
    m = re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", t)
    if m:
        return float(t)
    frac = re.fullmatch(r"\\d?frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", t)
    if frac and float(frac.group(2)) != 0:
        return float(frac.group(1)) / float(frac.group(2))
    return None


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def choice_index(extracted: str, choices: list[str], nearest: bool = False) -> Optional[int]:
    """Which option an extracted answer names: a letter ("B", "(B)", "B. text"), the option text,
    the option's value; with `nearest`, else the option with the smallest edit distance (MathVista's
    official fallback). None if undecidable."""
    t = extracted.strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?(?:[.:)]\s*.*)?", t, re.DOTALL)
    if m and m.group(1).upper() in LETTERS[:len(choices)] and (len(t) <= 3 or t[1:2] in ".:)" or t[0] == "("):
        return LETTERS.index(m.group(1).upper())
    cleaned = [_clean(c) for c in choices]
    if _clean(t) in cleaned:
        return cleaned.index(_clean(t))
    value = _to_float(t)
    if value is not None:
        for k, c in enumerate(choices):
            cv = _to_float(c)
            if cv is not None and abs(cv - value) < 1e-6:
                return k
    if nearest and t:
        dists = [_edit_distance(_clean(t), c) for c in cleaned]
        return dists.index(min(dists))
    return None


def _math_verify(gold: str, answer: str) -> bool:
    """math-verify with gold first (the order train_grpo.py's accuracy_reward uses). Errors -> False."""
    try:
        from math_verify import parse, verify

        return bool(verify(parse(f"${gold}$"), parse(f"${answer}$")))
    except Exception:  # math-verify raises many types on odd LaTeX; an unparsable answer is wrong
        return False


def score_answer(extracted: str, s: Sample) -> bool:
    """Rule-based correctness of an extracted answer against a sample's gold.

    - multiple choice: both sides mapped to an option index (gold may be a letter or the option text;
      MathVision counts the letter or the option value);
    - MathVista free form: normalised by answer_type (integer; float rounded to `precision`; list;
      text) and compared exactly, as MathVista's official scorer;
    - otherwise: exact after cleanup, numbers equal at 2 decimals (MathVision's rule), then math-verify.
    """
    if not extracted:
        return False
    if s.choices:
        gold = s.answer.strip()
        gold_idx = (LETTERS.index(gold.upper()) if len(gold) == 1 and gold.upper() in LETTERS[:len(s.choices)]
                    else choice_index(gold, s.choices))
        pred_idx = choice_index(extracted, s.choices, nearest=s.benchmark == "mathvista")
        if gold_idx is not None:
            return pred_idx == gold_idx
    if s.benchmark == "mathvista" and s.answer_type in ("integer", "float", "list"):
        try:
            if s.answer_type == "integer":
                return int(float(_clean(extracted).replace(",", ""))) == int(float(s.answer))
            if s.answer_type == "float":
                p = s.precision if s.precision is not None else 2
                return round(float(_clean(extracted).replace(",", "")), p) == round(float(s.answer), p)
            return _clean(extracted).replace(" ", "") == _clean(s.answer).replace(" ", "")
        except ValueError:
            return False
    if _clean(extracted) == _clean(s.answer):
        return True
    a, g = _to_float(extracted), _to_float(s.answer)
    if a is not None and g is not None:
        return round(a, 2) == round(g, 2)
    return _math_verify(s.answer, extracted)


LLM_EXTRACT_PROMPT = ("Read the response to a math problem and write only its final answer, with no "
                      "words around it.\n\nProblem:\n{problem}\n\nResponse:\n{response}\n\nFinal answer:")
LLM_JUDGE_PROMPT = ("Is the candidate answer equivalent to the reference answer of this problem? "
                    "Reply with exactly true or false.\n\nProblem:\n{problem}\n\nReference answer: "
                    "{gold}\nCandidate answer: {answer}\n\nVerdict:")


def _import_judge():
    try:
        import judge
    except ImportError as e:
        raise RuntimeError("this mode needs judge.py (the judging LLM client), which is not importable "
                           f"here ({e}); use --scoring rule and --judge_backend none") from e
    return judge


def llm_score(args: Args, samples: list[Sample], responses: list[str]) -> list[tuple[str, Optional[bool]]]:
    """The paper's scoring: an LLM extracts the answer, then says true/false vs the gold
    (PAPER.md s.2). Uses judge.ChatClient; a verdict that is neither true nor false gives None."""
    judge = _import_judge()
    if not hasattr(judge, "ChatClient"):
        raise RuntimeError("judge.py has no ChatClient; cannot run --scoring llm")
    client = judge.ChatClient([args.judge_base_url], args.judge_model, api_key_env=args.judge_api_key_env)
    sampling = {"temperature": 0.0, "max_tokens": args.judge_max_tokens}

    def ask(prompts: list[str]) -> list[Optional[str]]:
        # run_batch gives the text or the Exception per request; a failed request becomes None
        # (no verdict, counted in the summary), never a silent "wrong"
        replies = client.run_batch([[{"role": "user", "content": p}] for p in prompts], **sampling)
        for r in replies:
            if isinstance(r, Exception):
                print(f"judge request failed: {type(r).__name__}: {r}", file=sys.stderr)
        return [None if isinstance(r, Exception) else r for r in replies]

    gold = [s.answer if not s.choices else f"{s.answer}\n{_choices_text(s.choices)}" for s in samples]
    extracted = ask([LLM_EXTRACT_PROMPT.format(problem=s.problem, response=r) for s, r in zip(samples, responses)])
    todo = [k for k, e in enumerate(extracted) if e is not None]
    verdicts: list[Optional[str]] = [None] * len(samples)
    for k, v in zip(todo, ask([LLM_JUDGE_PROMPT.format(problem=samples[k].problem, gold=gold[k],
                                                       answer=extracted[k].strip()) for k in todo])):
        verdicts[k] = v
    out = []
    for e, v in zip(extracted, verdicts):
        v = (v or "").strip().lower()
        out.append(((e or "").strip(), True if v.startswith("true") else False if v.startswith("false") else None))
    return out


# =============================================================================================
# 4. Perception score r_v (judge.py)
# =============================================================================================
def perception_scores(args: Args, samples: list[Sample], responses: list[str]) -> list[Optional[float]]:
    """r_v per response where the sample has `visual_key_info` (None elsewhere or where the judge
    gave no verdict). The judge sees the whole response text, never the image (PAPER.md s.1)."""
    idx = [k for k, s in enumerate(samples) if s.visual_key_info and str(s.visual_key_info).strip()]
    out: list[Optional[float]] = [None] * len(samples)
    if not idx or args.judge_backend == "none":
        return out
    judge = _import_judge()
    scorer = judge.build_judge(judge.JudgeArgs(
        backend=args.judge_backend, base_urls=(args.judge_base_url,), model=args.perception_judge_model,
        api_key_env=args.judge_api_key_env, max_tokens=args.judge_max_tokens,
        vllm_dtype=args.dtype, vllm_enforce_eager=args.enforce_eager))
    scores = scorer.score([samples[k].visual_key_info for k in idx], [responses[k] for k in idx])
    for k, r in zip(idx, scores):
        out[k] = None if r is None else float(r)
    return out


# =============================================================================================
# 5. Reports
# =============================================================================================
BREAKDOWNS = {"mathvista": ("task", "skills"), "mathvision": ("subject", "level"),
              "mathvision_testmini": ("subject", "level"), "mathverse": ("problem_version",)}


def _mean(xs: list) -> Optional[float]:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(rows: list[dict], skipped: Optional[dict] = None) -> dict:
    """Per benchmark: n, accuracy (rule / llm), mean r_v (over annotated rows with a verdict) and
    breakdowns by the benchmark's categories."""
    summary: dict = {}
    # a benchmark whose rows were all skipped (no images) still gets an entry with n = 0
    for bench in sorted({r["benchmark"] for r in rows} | set(k for k, v in (skipped or {}).items() if v)):
        rs = [r for r in rows if r["benchmark"] == bench]
        entry: dict = {"n": len(rs), "accuracy": _mean([r.get("correct") for r in rs])}
        if any("correct_llm" in r for r in rs):
            entry["accuracy_llm"] = _mean([r.get("correct_llm") for r in rs])
            entry["llm_no_verdict"] = sum(r.get("correct_llm") is None for r in rs)
        rv = [r.get("r_v") for r in rs if r.get("r_v") is not None]
        entry["r_v"] = _mean(rv)
        entry["r_v_n"] = len(rv)
        if skipped:
            entry["skipped_no_image"] = skipped.get(bench, 0)
        for key in BREAKDOWNS.get(bench, ()):
            groups: dict = collections.defaultdict(list)
            for r in rs:
                vals = r.get("meta", {}).get(key)
                for v in (vals if isinstance(vals, list) else [vals]):
                    groups[str(v)].append(r.get("correct"))
            entry[f"by_{key}"] = {k: {"n": len(v), "accuracy": _mean(v)} for k, v in sorted(groups.items())}
        summary[bench] = entry
    return summary


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown_report(summary: dict, title: str = "Evaluation") -> str:
    lines = [f"# {title}", "", "| benchmark | n | accuracy % | LLM accuracy % | r_v (n) |", "|---|---|---|---|---|"]
    for bench, e in summary.items():
        lines.append(f"| {bench} | {e['n']} | {_pct(e['accuracy'])} | {_pct(e.get('accuracy_llm'))} | "
                     f"{_fmt(e['r_v'])} ({e['r_v_n']}) |")
    for bench, e in summary.items():
        for key in [k for k in e if k.startswith("by_")]:
            lines += ["", f"## {bench} by {key[3:]}", "", f"| {key[3:]} | n | accuracy % |", "|---|---|---|"]
            lines += [f"| {k} | {v['n']} | {_pct(v['accuracy'])} |" for k, v in e[key].items()]
    return "\n".join(lines) + "\n"


def plot_runs(summaries: dict[str, dict], path: str | Path) -> None:
    """Grouped bar chart: accuracy per benchmark, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = sorted({b for s in summaries.values() for b in s})
    fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(benches) + 1), 3.5))
    width = 0.8 / max(1, len(summaries))
    for k, (run, s) in enumerate(summaries.items()):
        vals = [100 * (s.get(b, {}).get("accuracy") or 0) for b in benches]
        ax.bar([i + k * width for i in range(len(benches))], vals, width, label=run)
    ax.set_xticks([i + width * (len(summaries) - 1) / 2 for i in range(len(benches))], benches)
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def score_rows(args: Args, samples: list[Sample], responses: list[str]) -> list[dict]:
    """Scores for each (sample, response): extracted, correct (rule), llm fields, r_v."""
    rows = []
    for s, resp in zip(samples, responses):
        ext = extract_answer(resp, s.choices)
        rows.append({"extracted": ext, "correct": score_answer(ext, s)})
    if args.scoring in ("llm", "both"):
        for row, (ext, ok) in zip(rows, llm_score(args, samples, responses)):
            row.update({"extracted_llm": ext, "correct_llm": ok})
        if args.scoring == "llm":  # the LLM verdict is the headline number
            for row in rows:
                row["correct_rule"], row["correct"] = row["correct"], row["correct_llm"]
    for row, rv in zip(rows, perception_scores(args, samples, responses)):
        row["r_v"] = rv
    return rows


def eval_main(args: Args) -> dict:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = dict(item.split("=", 1) for item in args.data)
    samples = []
    for name in args.benchmarks:
        if name not in BENCHMARKS and name not in sources:
            raise ValueError(f"unknown benchmark '{name}': use one of {BENCHMARK_NAMES} or pass --data {name}=FILE")
        samples += load_benchmark(name, sources.get(name), args.limit)
    gen_path = out / "generations.jsonl"
    counts = generate(args, samples, gen_path)
    generated = {(r["benchmark"], str(r["id"])): r for r in data.read_jsonl(gen_path)}
    have = [s for s in samples if (s.benchmark, s.id) in generated]
    skipped = collections.Counter(s.benchmark for s in samples if (s.benchmark, s.id) not in generated)
    responses = [generated[(s.benchmark, s.id)]["response"] for s in have]
    scores = score_rows(args, have, responses)
    rows = [{"benchmark": s.benchmark, "id": s.id, "prompt": generated[(s.benchmark, s.id)]["prompt"],
             "response": r, "gold": s.answer, **sc, "meta": s.meta} for s, r, sc in zip(have, responses, scores)]
    data.write_jsonl(out / "samples.jsonl", rows)
    summary = summarize(rows, dict(skipped))
    (out / "summary.json").write_text(json.dumps({"counts": counts, "benchmarks": summary}, indent=2))
    (out / "report.md").write_text(markdown_report(summary, f"Evaluation of {args.model}"))
    plot_runs({out.name: summary}, out / "accuracy.png")
    for bench, e in summary.items():
        print(f"{bench}: n={e['n']} accuracy={_pct(e['accuracy'])}%" + (f" skipped(no image)={skipped[bench]}" if skipped[bench] else ""))
    return summary


# =============================================================================================
# 6. Re-scoring published responses
# =============================================================================================
def score_main(args: ScoreArgs) -> list[dict]:
    samples = load_benchmark(args.benchmark, args.data, split=args.split)
    by_id = {s.id: s for s in samples}
    id_field = BENCHMARKS.get(args.benchmark, BENCHMARKS["local"])[3]
    rows = data.read_jsonl(args.responses)
    out = []
    for n, row in enumerate(rows, 1):
        rid = row.get(id_field, row.get("id", row.get("pid")))
        if rid is None or str(rid) not in by_id:
            raise data.RowError(f"{args.responses}: line {n}: id {rid!r} (field '{id_field}') not in {args.data}")
        ext = extract_answer(row.get("response") or "", by_id[str(rid)].choices)
        out.append({**row, "extracted": ext, "correct": score_answer(ext, by_id[str(rid)])})
    data.write_jsonl(args.output, out)
    per_model: dict = collections.defaultdict(list)
    for row in out:
        per_model[row.get("model", "all")].append(row["correct"])
    for model, xs in sorted(per_model.items(), key=lambda kv: -_mean(kv[1])):
        print(f"{model:40s} n={len(xs):4d} accuracy={_pct(_mean(xs))}%")
    # MathVista's released responses carry the authors' own (GPT-4) `extraction`: scoring it with
    # our normaliser and comparing verdicts measures how far our rule-based extraction drifts
    with_ext = [(row, by_id[str(row.get(id_field, row.get("id")))]) for row in out if row.get("extraction") is not None]
    if with_ext:
        agree = sum(score_answer(str(r["extraction"]), s) == r["correct"] for r, s in with_ext)
        print(f"verdict agreement with the provided `extraction`: {agree}/{len(with_ext)} "
              f"= {_pct(agree / len(with_ext))}%")
    return out


# =============================================================================================
# 7. McNemar comparison
# =============================================================================================
def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: under H0 the b + c discordant pairs split Binomial(n, 1/2);
    p = min(1, 2 * P[X <= min(b, c)]) = min(1, 2 * sum_{i<=min(b,c)} C(n, i) / 2^n).

    >>> round(mcnemar_exact(2, 10), 4)
    0.0386
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def _run_rows(run: str) -> dict[tuple[str, str], dict]:
    path = Path(run)
    path = path / "samples.jsonl" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no samples.jsonl for run {run}")
    return {(r["benchmark"], str(r["id"])): r for r in data.read_jsonl(path)}


def paired_counts(a: list[bool], b: list[bool]) -> tuple[int, int]:
    """(b, c): pairs where only A is correct, pairs where only B is correct."""
    return sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))


def compare_main(args: CompareArgs) -> dict:
    ra, rb = _run_rows(args.run_a), _run_rows(args.run_b)
    keys = sorted(set(ra) & set(rb))
    result = {"n_paired": len(keys)}
    print(f"paired samples: {len(keys)} (only in A: {len(set(ra) - set(rb))}, only in B: {len(set(rb) - set(ra))})")
    pk = [k for k in keys if ra[k].get("r_v") is not None and rb[k].get("r_v") is not None]
    for what, ks, f in (("answer", keys, lambda r: bool(r.get("correct"))),
                        ("perception", pk, lambda r: r["r_v"] >= args.perception_threshold)):
        if not ks:
            print(f"{what}: no paired samples")
            continue
        xa, xb = [f(ra[k]) for k in ks], [f(rb[k]) for k in ks]
        b, c = paired_counts(xa, xb)
        p = mcnemar_exact(b, c)
        result[what] = {"n": len(ks), "acc_a": _mean(xa), "acc_b": _mean(xb), "b": b, "c": c, "p": p}
        print(f"{what}: n={len(ks)} A={_pct(_mean(xa))}% B={_pct(_mean(xb))}% "
              f"b(A only)={b} c(B only)={c} McNemar exact p={p:.4f}")
    if args.chart:
        summaries = {}
        for name, rows in ((Path(args.run_a).name, ra), (Path(args.run_b).name, rb)):
            summaries[name] = summarize([rows[k] for k in keys])
        plot_runs(summaries, args.chart)
    return result


def main(argv: Optional[list[str]] = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    # first-positional dispatch; `eval` is the default so `evaluate.py --model ...` works too
    commands: dict[str, tuple[type, Callable]] = {"eval": (Args, eval_main), "score": (ScoreArgs, score_main),
                                                   "compare": (CompareArgs, compare_main)}
    if argv and argv[0] in commands:
        cmd, argv = argv[0], argv[1:]
    elif argv and argv[0] in ("-h", "--help"):
        print(__doc__ + "\nsubcommands: eval (default), score, compare; "
              "`evaluate.py SUBCOMMAND --help` lists every option.")
        return None
    else:
        cmd = "eval"
    cls, fn = commands[cmd]
    return fn(tyro.cli(cls, args=argv, prog=f"evaluate.py {cmd}"))


if __name__ == "__main__":
    main()
