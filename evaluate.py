r"""Benchmark evaluation for Perception-R1: generate with vLLM, score answers, score perception,
compare two runs with McNemar's exact test.

What it does
    `eval`: loads benchmark rows (MathVista, MathVerse, MathVision, WeMath, Geometry3K or any local
    file in the training schema) into one internal row type, generates one greedy response per row
    with vLLM, appends each response to `<output_dir>/generations.jsonl` as soon as its batch
    finishes (a killed run resumes and skips done ids), scores every response, measures the
    perception score r_v where rows carry `visual_key_info`, and writes `samples.jsonl`,
    `summary.json`, `report.md` and `accuracy.png`. Two protocols:
      training (default)  the training prompt (problem + our instruction, images where `<image>`
                          stands), the training image bounds (3,136 to 1,806,336 pixels), and
                          rule-based scoring: offline, deterministic, our numbers.
      paper               the authors' evaluation scripts: per benchmark their question text
                          (MathVista `query`; MathVerse `question`; MathVision `question` +
                          "\nChoices:\n" + "A. x" lines when it has more than one option; WeMath
                          `question` + "\nChoices:\n" + `option`), then " " + the instruction, the
                          image before the text, greedy, 4,096 new tokens, images within 3,136 and
                          12,845,056 pixels, and their LLM scoring (below). Use it to compare with
                          the paper's table.
    `score`: re-scores existing responses (one input row -> one output row, order and fields kept).
    `compare RUN_A RUN_B`: accuracy of each run, discordant counts b, c and the exact McNemar p,
    for answers and for perception; it refuses runs scored differently unless --allow_mixed.

Scoring
    rule  a strict extraction (an `<answer>` block, the last \boxed{}, an "answer is X" phrase, or a
          short response taken whole; for multiple choice only a letter standing as an answer or a
          whole option counts, else nothing is extracted), then per benchmark: MATH-Vision's own
          rule-based evaluation rules (mathllm/MATH-V); MathVista's own normalisation (letter ->
          option text, int, float rounded to `precision`, list) and exact match; elsewhere option
          letters, exact text, numbers at 2 decimals, then math-verify through train_grpo.math_equal
          (the one answer checker of training, annotation and evaluation).
    llm   the paper's: the first `<answer>` block is the extraction when present; otherwise an LLM
          extracts the answer (a prompt with five worked examples); then a true/false judgement that
          sees only the choices ("A. x" lines, when the item has choices), the extracted answer and
          the gold, temperature 0, at most 128 new tokens. Any OpenAI-compatible server through
          judge.py's client (paper: Qwen2.5-72B-Instruct). A verdict that is neither true nor false,
          or a failed request, is no verdict: counted, excluded from the mean.
    summary.json, report.md and samples.jsonl name the protocol and the scoring of every number.

Papers
    Perception-R1 (arXiv 2506.07218) - benchmarks, LLM-judged accuracy, McNemar analysis.
    MathVista (arXiv 2310.02255), MathVerse (arXiv 2403.14624), MATH-Vision (arXiv 2402.14804),
    We-Math (arXiv 2407.01284), Geometry3K / Inter-GPS (arXiv 2105.04165).

Code map (section -> paper -> function)
    1. Arguments    -> protocols, judges              -> EvalArgs, ScoreArgs, CompareArgs
    2. Loading      -> benchmark columns              -> BENCHMARKS, load_benchmark, to_sample_*
    3. Prompts      -> training / paper protocol      -> sample_messages
    4. Generation   -> greedy, resumable              -> generate, done_keys
    5. Rule scoring -> strict extraction, official    -> extract_answer, choice_index, mathvista_normalize,
                       MathVista / MATH-V rules          mathvision_extract, mathvision_equal, score_response
    6. LLM scoring  -> the paper's judge procedure    -> llm_score, judge_messages, extract_messages
    7. Perception   -> r_v = mean judged facts        -> perception_scores (judge.build_judge)
    8. Reports      -> per-benchmark accuracy         -> summarize, markdown_report, plot_runs
    9. Re-scoring   -> published responses            -> score_main
   10. Comparison   -> exact two-sided McNemar        -> mcnemar_exact, compare_main

Deviations from the paper's evaluation
    1. The default protocol is ours (training prompt, rule-based scoring); `--protocol paper`
       follows the authors' scripts. Numbers of different protocols or scorings are not comparable
       (independent re-evaluations of the same model differ by several points).
    2. LLM scoring: a failed request or a verdict that is neither "true" nor "false" is no verdict
       (counted, excluded from the mean). The authors' release stops at the raw judge text; how it
       became accuracy is not public.
    3. The paper labels perception-correct by hand (50 MathVista geometry problems); `compare`
       uses r_v >= `--perception_threshold` (default 1.0: every annotated fact stated) as the label.
    4. MathVista rule scoring replaces MathVista's GPT extraction by our strict extraction; an
       empty extraction is wrong (MathVista's own flag --ignore_empty_extractions) instead of
       being mapped to the nearest option.
    5. MATH-Vision rule scoring evaluates LaTeX numerically with sympy (latex2sympy2_extended)
       where the official script runs Python's eval on latex2sympy2's output.

Launch
    CPU tiny run:  VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 python evaluate.py eval \
                       --model tiny_model --benchmarks demo --data demo=demo_data/test.jsonl --limit 8 \
                       --dtype float32 --enforce_eager --max_model_len 4096 --output_dir runs/tiny
    1 GPU:         python evaluate.py eval --model ckpt/ --output_dir runs/pr1
    paper protocol (judge: vllm serve Qwen/Qwen2.5-72B-Instruct --tensor-parallel-size 4):
                   python evaluate.py eval --protocol paper --model ckpt/ --output_dir runs/pr1-paper \
                       --answer_judge.base_urls http://JUDGE:8000/v1
    Re-score:      python evaluate.py score --benchmark mathvista --data testmini.jsonl \
                       --responses responses.jsonl --output scored.jsonl
    Compare:       python evaluate.py compare runs/base runs/pr1
"""

from __future__ import annotations

import ast
import collections
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import tyro

import data  # shared plumbing: prompt, images, JSONL files (no algorithm)
from data import INSTRUCTION
from judge import JudgeArgs

BENCHMARK_NAMES = ("mathvista", "mathverse", "mathvision", "mathvision_testmini", "wemath", "geometry3k")
# The authors' evaluation image bounds: qwen_vl_utils' defaults (4 and 16,384 patches of 28x28 px)
PAPER_EVAL_MIN_PIXELS, PAPER_EVAL_MAX_PIXELS = 3_136, 12_845_056


# =============================================================================================
# 1. Arguments
# =============================================================================================
def _answer_judge() -> JudgeArgs:
    """The paper's answer judge: Qwen2.5-72B-Instruct, temperature 0, short output (128 tokens)."""
    return JudgeArgs(model="Qwen/Qwen2.5-72B-Instruct", max_tokens=128, max_failure_rate=1.0)


@dataclasses.dataclass
class EvalArgs:
    """Generate with vLLM, score, report. `--protocol paper` follows the authors' evaluation
    scripts (prompt per benchmark, image first, greedy, 4,096 tokens, 3,136-12,845,056 pixels, LLM
    scoring); the default protocol uses the training prompt and rule-based scoring."""

    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """model folder or Hugging Face id (the paper evaluates Qwen2.5-VL-7B and its GRPO checkpoint)"""
    benchmarks: tuple[str, ...] = ("mathvista", "mathverse", "mathvision", "wemath")
    """benchmarks to run: mathvista (testmini), mathverse (testmini), mathvision (test),
    mathvision_testmini, wemath (testmini), geometry3k (test), or any name given in --data
    (loaded as a local file in the training schema unless the name is a known benchmark).
    Default: the four benchmarks of the paper's table that have public scoring"""
    data: tuple[str, ...] = ()
    """overrides of the data source as NAME=SOURCE (a local .jsonl/.json/.parquet or an HF dataset id);
    default sources are the benchmarks' Hugging Face ids"""
    limit: Optional[int] = None
    """rows per benchmark (first N); None = all"""
    output_dir: str = "runs/eval"
    """run folder: generations.jsonl (resumable), samples.jsonl, summary.json, report.md, accuracy.png"""
    skip_missing_images: bool = True
    """skip (and count) rows whose image cannot be found; False = stop with the row's error"""
    protocol: Literal["training", "paper"] = "training"
    """training: our training prompt and image bounds, rule scoring by default. paper: the authors'
    evaluation scripts (see the top of this help), LLM scoring by default"""
    instruction: str = INSTRUCTION
    """text appended to every question (after one space), or @FILE; the same default as training.
    The authors' text: the SYSTEM_PROMPT of their evaluate_*.py scripts (README, "Prompt")"""
    # --- generation (vLLM) ---
    max_new_tokens: int = 4096
    """response length limit in tokens (official: 4,096)"""
    temperature: float = 0.0
    """sampling temperature; 0 = greedy (default, the authors' setting)"""
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
    min_pixels: Optional[int] = None
    """image resize lower bound in pixels (None: 3,136 for both protocols)"""
    max_pixels: Optional[int] = None
    """image resize upper bound in pixels (None: 1,806,336 = training for the training protocol,
    12,845,056 = qwen_vl_utils' default, what the authors' evaluation used, for the paper protocol)"""
    # --- scoring ---
    scoring: Optional[Literal["rule", "llm", "both"]] = None
    """answer scoring: rule, llm (the paper's judge procedure) or both side by side (the headline
    is the first). None: rule for the training protocol, llm for the paper protocol"""
    gold_parse: Literal["latex", "official"] = "latex"
    """how math-verify reads gold answers in rule scoring (train_grpo --gold_parse)"""
    answer_judge: JudgeArgs = dataclasses.field(default_factory=_answer_judge)
    """the LLM of --scoring llm (paper: Qwen2.5-72B-Instruct; any OpenAI-compatible server)"""
    perception: bool = False
    """also score r_v (the judge below) on rows that carry `visual_key_info`"""
    judge: JudgeArgs = dataclasses.field(default_factory=JudgeArgs)
    """the perception judge for r_v (judge.py; paper: Qwen2.5-32B-Instruct-AWQ)"""

    def __post_init__(self):
        # fail loudly on settings that would otherwise fail late (after the engine started)
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.tensor_parallel_size < 1:
            raise ValueError("batch_size, max_new_tokens and tensor_parallel_size must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        self.min_pixels = self.min_pixels or data.PAPER_MIN_PIXELS
        self.max_pixels = self.max_pixels or (PAPER_EVAL_MAX_PIXELS if self.protocol == "paper" else data.PAPER_MAX_PIXELS)
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        self.scoring = self.scoring or ("llm" if self.protocol == "paper" else "rule")
        self.instruction = data.resolve_instruction(self.instruction)
        for item in self.data:
            if "=" not in item:
                raise ValueError(f"--data takes NAME=SOURCE, got {item!r}")


@dataclasses.dataclass
class ScoreArgs:
    """Re-score existing responses without a model (one output row per input row, order kept)."""

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
    scoring: Literal["rule", "llm", "both"] = "rule"
    """rule-based, the paper's LLM judge, or both (the headline is the first)"""
    extraction_field: Optional[str] = None
    """MathVista: a field holding an extraction made elsewhere (the released responses carry MathVista's
    own GPT `extraction`); rule scoring then applies MathVista's rules to it instead of our extraction,
    which gives MathVista's official verdicts"""
    gold_parse: Literal["latex", "official"] = "latex"
    """how math-verify reads gold answers in rule scoring (train_grpo --gold_parse)"""
    answer_judge: JudgeArgs = dataclasses.field(default_factory=_answer_judge)
    """the LLM of --scoring llm (paper: Qwen2.5-72B-Instruct)"""


@dataclasses.dataclass
class CompareArgs:
    """Compare two runs (paired by benchmark and id) with McNemar's exact test."""

    run_a: tyro.conf.Positional[str]
    """run folder (or its samples.jsonl, or a train_grpo val/step-N.jsonl) of the first model"""
    run_b: tyro.conf.Positional[str]
    """run folder or samples file of the second model, e.g. Perception-R1"""
    perception_threshold: float = 1.0
    """a response is perception-correct when r_v >= this (1.0: every annotated fact stated)"""
    chart: Optional[str] = None
    """PNG path for a bar chart of both runs per benchmark (None = no chart)"""
    allow_mixed: bool = False
    """compare runs even when their protocol or scoring differ (their numbers are not comparable)"""


# =============================================================================================
# 2. Loading: every benchmark -> one internal row type
# =============================================================================================
@dataclasses.dataclass
class Sample:
    benchmark: str
    id: str  # the benchmark's own id (MathVista pid, MathVision id, ...), as a string
    problem: str  # training-protocol text; `<image>` where each image goes
    images: list  # image references (paths, {"bytes","path"} dicts, PIL images); opened lazily
    answer: str  # gold answer (MathVista: option text for MC; MathVision/WeMath/MathVerse: letter)
    choices: Optional[list[str]] = None  # option texts (A, B, ... in order) for multiple choice
    answer_type: Optional[str] = None  # MathVista: text | integer | float | list
    precision: Optional[int] = None  # MathVista: decimals for floats
    visual_key_info: Optional[str] = None  # "<info1>..</info1>..." where annotated
    meta: dict = dataclasses.field(default_factory=dict)  # breakdown keys (task, skills, subject, ...)
    base_dir: Optional[str] = None  # folder for relative image paths
    paper_text: Optional[str] = None  # the question text of the authors' evaluation script
    judge_choices: Optional[str] = None  # the choices the paper's answer judge sees (None: open-ended)
    extract_question: Optional[str] = None  # the question shown to the paper's LLM extractor (if any)
    task: str = "geometry"  # or a perception task of the sister paper: grounding, counting, ocr, detection
    classes: Optional[list[str]] = None  # detection: the category names the model may answer


# name -> (HF dataset id, config, split, the row's id field)
BENCHMARKS: dict[str, tuple[str, Optional[str], str, str]] = {
    "mathvista": ("AI4Math/MathVista", None, "testmini", "pid"),
    "mathverse": ("AI4Math/MathVerse", "testmini", "testmini", "sample_index"),
    "mathvision": ("MathLLMs/MathVision", None, "test", "id"),
    "mathvision_testmini": ("MathLLMs/MathVision", None, "testmini", "id"),
    "wemath": ("We-Math/We-Math", None, "testmini", "ID"),
    "geometry3k": ("hiyouga/geometry3k", None, "test", "id"),
    "local": ("", None, "test", "id"),
    # the sister paper's perception benchmarks (arXiv 2504.07954)
    "refcoco": ("lmms-lab/RefCOCO", None, "val", "question_id"),
    "refcoco+": ("lmms-lab/RefCOCOplus", None, "val", "question_id"),
    "refcocog": ("lmms-lab/RefCOCOg", None, "val", "question_id"),
    "pixmo_count": ("allenai/pixmo-count", None, "test", "image_sha256"),
    "pageocr": ("", None, "test", "image"),  # a local Fox page-OCR file (en_page_ocr.json)
    "coco_det": ("", None, "val", "image_id"),  # a local COCO file (annotations/instances_val2017.json)
}
TASK_OF = {"refcoco": "grounding", "refcoco+": "grounding", "refcocog": "grounding", "pixmo_count": "counting",
           "pageocr": "ocr", "coco_det": "detection"}
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
    """Our training-protocol choice block: "Choices:\n(A) x\n(B) y"."""
    return "Choices:\n" + "\n".join(f"({LETTERS[k]}) {c}" for k, c in enumerate(choices))


def _lettered(choices: list[str]) -> str:
    """The authors' choice lines: "A. x\nB. y"."""
    return "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(choices))


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
    query = row.get("query") or row["question"]
    choices = _as_list(row.get("choices"))
    return Sample("mathvista", str(row["pid"]), query, images, str(row["answer"]), choices, row.get("answer_type"),
                  None if row.get("precision") is None else int(float(row["precision"])), row.get("visual_key_info"),
                  {"task": md.get("task"), "skills": md.get("skills") or [], "question_type": row.get("question_type")},
                  base, paper_text=query, judge_choices=_lettered(choices) if choices else None, extract_question=query)


def _mathverse_choices(row: dict) -> tuple[Optional[list[str]], Optional[str]]:
    """(option texts, the choice text the authors' judge sees) of a multiple-choice MathVerse row:
    the text after the first "Choices:"/"Choice:" of question_for_eval (or question)."""
    if str(row.get("question_type", "")).replace("_", "-") != "multi-choice":
        return None, None
    text = row.get("question_for_eval") or row.get("question") or ""
    m = re.search(r"(?:Choices|Choice):(.+)", text, re.DOTALL)
    if not m:
        return None, None
    options = re.findall(r"^\s*\(?([A-H])[.:)]\s*(.*?)\s*$", m.group(1), re.MULTILINE)
    return ([o for _, o in options] or None), m.group(1)


def to_sample_mathverse(row: dict, base: Optional[str]) -> Sample:
    md = row.get("metadata") or {}
    rid = row.get("sample_index", row.get("pid"))
    version = row.get("problem_version") or md.get("problem_version")
    choices, judge_choices = _mathverse_choices(row)
    # the question already lists the options for multiple choice (the answer is a letter)
    return Sample("mathverse", str(rid), row["question"], _first_image(row, "image"), str(row["answer"]), choices,
                  None, None, row.get("visual_key_info"), {"problem_version": version}, base,
                  paper_text=row["question"], judge_choices=judge_choices)


def to_sample_mathvision(row: dict, base: Optional[str], name: str = "mathvision") -> Sample:
    options = _as_list(row.get("options"))
    question = re.sub(r"<image\d*>", "<image>", row["question"])
    if options:
        question = question + "\n" + _choices_text(options)
    # the authors' script keeps the raw question (its "<image1>" marks are plain text there) and adds
    # the choices only when there is more than one option
    paper = row["question"] + ("\nChoices:\n" + _lettered(options) if options and len(options) > 1 else "")
    return Sample(name, str(row["id"]), question, _first_image(row, "decoded_image", "image"),
                  str(row["answer"]), options, None, None, row.get("visual_key_info"),
                  {"subject": row.get("subject"), "level": row.get("level")}, base, paper_text=paper,
                  judge_choices=_lettered(options) if options else None, extract_question=row["question"])


def _split_wemath_options(option: str) -> list[str]:
    """"A. 300, 400;B. 400, 300; E. No correct answer" -> ["300, 400", "400, 300", "No correct answer"]."""
    parts = re.split(r";\s*(?=[A-Z]\.)", option.strip())
    return [re.sub(r"^[A-Z]\.\s*", "", p).strip() for p in parts if p.strip()]


def to_sample_wemath(row: dict, base: Optional[str]) -> Sample:
    option = row.get("option") or ""
    options = _split_wemath_options(option)
    question = row["question"] + ("\n" + _choices_text(options) if options else "")
    return Sample("wemath", str(row["ID"]), question, _first_image(row, "image_path", "image"),
                  str(row["answer"]), options or None, None, None, row.get("visual_key_info"),
                  {"knowledge concept": row.get("knowledge concept")}, base,
                  paper_text=row["question"] + "\nChoices:\n" + option, judge_choices=option if option.strip() else None)


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
                  row.get("visual_key_info"), {}, base, paper_text=problem.replace(data.IMAGE_PLACEHOLDER, "").strip(),
                  judge_choices=_lettered(choices) if choices else None, task=row.get("task") or "geometry",
                  classes=row.get("classes"))


def to_sample_refcoco(row: dict, base: Optional[str], name: str) -> Sample:
    """lmms-lab/RefCOCO(+/g): question_id, image, answer (referring expressions), bbox [x, y, w, h]
    in pixels of the original image. The first expression is the question."""
    x, y, w, h = (float(v) for v in row["bbox"])
    expr = row["answer"][0] if isinstance(row["answer"], (list, tuple)) else str(row["answer"])
    return Sample(name, str(row["question_id"]), expr, _first_image(row, "image", "file_name"),
                  json.dumps([x, y, x + w, y + h]), base_dir=base, task="grounding")


def to_sample_pixmo(row: dict, base: Optional[str]) -> Sample:
    """allenai/pixmo-count: image_url, image_sha256, count, points ([{x, y}], train only), label.
    The images are not in the dataset: download image_url to <data folder>/<image_sha256>.jpg (or
    give an `image` column)."""
    images = _first_image(row, "image", "image_path") or [f"{row['image_sha256']}.jpg"]
    points = [[p["x"], p["y"]] for p in row.get("points") or []]
    return Sample("pixmo_count", str(row["image_sha256"]), str(row["label"]), images, json.dumps(points),
                  meta={"count": int(row["count"])}, base_dir=base, task="counting")


def to_sample_pageocr(row: dict, base: Optional[str]) -> Sample:
    """Fox page OCR (the sister paper's PageOCR): image, conversations [{from: human}, {from: gpt,
    value: the page text}]."""
    text = next(c["value"] for c in row["conversations"] if c.get("from") == "gpt")
    return Sample("pageocr", str(row["image"]), "text", [row["image"]], text, base_dir=base, task="ocr")


def coco_rows(path: Path) -> list[dict]:
    """A COCO detection file (instances_val2017.json) as one row per image: image (file next to
    the json, or in ../val2017/), the gold boxes [x1, y1, x2, y2] in pixels and category names."""
    coco = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_image = collections.defaultdict(list)
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        by_image[a["image_id"]].append({"bbox_2d": [x, y, x + w, y + h], "label": names[a["category_id"]]})
    folder = path.parent if (path.parent / coco["images"][0]["file_name"]).exists() else path.parent.parent / "val2017"
    return [{"image_id": im["id"], "image": str(folder / im["file_name"]), "objects": by_image[im["id"]],
             "classes": [names[k] for k in sorted(names)]} for im in coco["images"]]


def to_sample_coco(row: dict, base: Optional[str]) -> Sample:
    return Sample("coco_det", str(row["image_id"]), "objects", [row["image"]], json.dumps(row["objects"]),
                  base_dir=base, task="detection", classes=list(row["classes"]))


def to_sample(name: str, row: dict, base: Optional[str]) -> Sample:
    if TASK_OF.get(name) == "grounding":
        return to_sample_refcoco(row, base, name)
    loader = {"pixmo_count": to_sample_pixmo, "pageocr": to_sample_pageocr, "coco_det": to_sample_coco}.get(name)
    if loader is not None:
        return loader(row, base)
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
    """Rows of one benchmark as Samples. `source`: local file or HF id (default: the benchmark's)."""
    hf_id, config, default_split, _ = BENCHMARKS.get(name, BENCHMARKS["local"])
    source = source or hf_id
    if not source:
        raise ValueError(f"benchmark '{name}' has no default source: pass --data {name}=FILE")
    path = Path(source)
    if name == "coco_det":  # one COCO annotation file, not rows
        rows = coco_rows(path)[:limit]
        base = str(path.resolve().parent)
    elif path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
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
# 3. Prompts: the training protocol or the authors' evaluation protocol
# =============================================================================================
def perception_text(row: dict) -> str:
    """The sister paper's prompt of a perception row (perception_rewards.TASK_PROMPTS)."""
    from perception_rewards import TASK_PROMPTS

    return TASK_PROMPTS[row["task"]].format(question=row["problem"], categories=", ".join(row.get("classes") or []))


def sample_messages(s: Sample, num_images: int, protocol: str, instruction: str) -> list[dict]:
    """One user turn. training: the problem with images where `<image>` stands (data.build_messages).
    paper: every image first, then the authors' question text + " " + instruction."""
    if s.task != "geometry":  # a perception task: its template, images first, no instruction
        row = {"task": s.task, "problem": s.problem, "classes": s.classes}
        return data.build_messages(perception_text(row), num_images, None)
    if protocol == "training":
        return data.build_messages(s.problem, num_images, instruction)
    text = f"{s.paper_text or s.problem} {instruction}"
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


# =============================================================================================
# 4. Generation with vLLM (resumable)
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


def generate(args: EvalArgs, samples: list[Sample], out_path: Path) -> dict[str, int]:
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
    # pixels we resized already (same bounds, so the same image tokens as the processor would give).
    processor = AutoProcessor.from_pretrained(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    llm = LLM(model=args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
              max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, seed=args.seed,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=True,
              limit_mm_per_prompt={"image": max(1, max(len(s.images) for s in todo))},
              mm_processor_kwargs={"min_pixels": args.min_pixels, "max_pixels": args.max_pixels},
              **data.vllm_cpu_settings(args.model, args.max_model_len, args.batch_size))
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
                messages = sample_messages(s, len(images), args.protocol, args.instruction)  # ALGO: the prompt
                prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                frame = [*images[0].info.get("original_size", images[0].size), *images[0].size] if images else None
                batch.append((s, prompt, frame))
                inputs.append({"prompt": prompt, **({"multi_modal_data": {"image": images}} if images else {})})
            if inputs:
                outputs = llm.generate(inputs, params, use_tqdm=False)
                for (s, prompt, frame), out in zip(batch, outputs):
                    data.append_jsonl(fh, {"benchmark": s.benchmark, "id": s.id, "prompt": prompt,
                                           "response": out.outputs[0].text, "protocol": args.protocol,
                                           "finish_reason": out.outputs[0].finish_reason, "frame": frame})
                    counts["generated"] += 1
            bar.update(len(todo[start:start + args.batch_size]))
    return counts


# =============================================================================================
# 5. Rule-based scoring
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
# "the answer is X", "Final answer: X", "the correct option is (C)": the phrase needs "is", ":" or "="
_ANSWER_PHRASE = re.compile(r"(?:\b(?:final\s+|correct\s+)?(?:answer|option|choice)\s*(?:is|:|=)\s*:?|"
                            r"(?:答案|选项)\s*(?:是|为|:|：))\s*((?-i:\(?[A-Z]\)?)(?![A-Za-z])|[^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def answer_candidate(response: str) -> str:
    r"""The text a response puts forward as its answer, "" if none: inside the last non-empty
    `<answer>` block (else the whole response) the last \boxed{}; else the block's text; else the last
    "answer is X" phrase (up to the sentence end); else a short response (<= 40 characters) whole."""
    blocks = _ANSWER_BLOCK.findall(response or "")
    in_block = bool(blocks and blocks[-1].strip())
    region = blocks[-1] if in_block else (response or "")
    boxed = last_boxed(region) if not in_block or last_boxed(region) is not None else last_boxed(response)
    if boxed is not None:
        return boxed
    if in_block:
        return region.strip()
    phrases = _ANSWER_PHRASE.findall(region)
    if phrases:
        ans = re.split(r"\.(?=\s|$)", phrases[-1].strip())[0].strip()  # cut at the sentence end, keep decimals
        return ans.strip(" *$")
    return region.strip() if len(region.strip()) <= 40 else ""


def extract_answer(response: str, choices: Optional[list[str]] = None) -> str:
    r"""The final answer of a response ("" if it commits to none).

    Free form: `answer_candidate`, else the last number of the response. Multiple choice: the
    option letter the candidate names ("(B)", "B.", "B)", "B", "option B", "\text{B}", "B. text",
    or a whole option text / value); a letter or option text elsewhere in the response never counts.

    >>> extract_answer("Looking at the figure... so the answer is (C).", ["1", "2", "3"])
    'C'
    >>> extract_answer("The ant ends up on the parrot", ["A", "B", "C", "D", "E"])
    ''
    """
    cand = answer_candidate(response)
    if choices:
        k = choice_index(cand, choices)
        if k is None:  # a response that opens with "(C) <option C's text>" or just "(C)"
            first = (response or "").strip().split("\n")[0]
            m = re.fullmatch(r"\(?([A-Z])[.):]?\s*(.*)", first.strip())
            if m and m.group(1) in LETTERS[:len(choices)] and (
                    not m.group(2) or _clean(m.group(2)) == _clean(choices[LETTERS.index(m.group(1))])):
                k = LETTERS.index(m.group(1))
        return LETTERS[k] if k is not None else ""
    if cand:
        return cand
    numbers = _NUMBER.findall(response or "")
    return numbers[-1].replace(",", "") if numbers else ""


def _clean(text: str) -> str:
    """Normalise for exact comparison: strip LaTeX wrappers, spaces, trailing period, case."""
    t = str(text).strip()
    t = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", t)
    t = t.replace("\\%", "%").replace("$", "").replace("\\,", "").replace("^\\circ", "").replace("°", "")
    t = t.replace("**", "")
    return re.sub(r"\s+", " ", t).strip(" .").lower()


def _to_float(text: str) -> Optional[float]:
    t = _clean(text).replace(",", "").rstrip("%")
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", t):
        return float(t)
    frac = re.fullmatch(r"\\d?frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", t)
    if frac and float(frac.group(2)) != 0:
        return float(frac.group(1)) / float(frac.group(2))
    return None


_LETTER_SHAPES = (
    re.compile(r"\(([A-Za-z])\)(?:\s.*)?", re.DOTALL),  # (B), (b), "(B) 70°"
    re.compile(r"([A-Z])[.:)](?:\s.*)?", re.DOTALL),  # B. B) B: "B. 70°"
    re.compile(r"([A-Z])"),  # a bare B
    re.compile(r"(?:option|choice)\s*\(?([A-Z])\)?", re.IGNORECASE),  # option B
)


def choice_index(text: str, choices: list[str]) -> Optional[int]:
    """Which option a candidate answer names, or None: a letter standing as an answer (the shapes
    above, within the options' range), else a whole option (same text after `_clean`, or the same
    number). Nothing else: a word that merely contains an option's text does not count."""
    t = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", str(text)).strip().strip("$*").strip()
    for shape in _LETTER_SHAPES:
        m = shape.fullmatch(t)
        if m and m.group(1).upper() in LETTERS[:len(choices)]:
            return LETTERS.index(m.group(1).upper())
    cleaned = [_clean(c) for c in choices]
    if t and _clean(t) in cleaned:
        return cleaned.index(_clean(t))
    value = _to_float(t)
    if value is not None:
        for k, c in enumerate(choices):
            if (cv := _to_float(c)) is not None and abs(cv - value) < 1e-6:
                return k
    return None


def gold_letter(s: Sample) -> Optional[int]:
    """Index of the gold option: the gold is a letter (MathVision, MathVerse, WeMath) or an option text."""
    gold = s.answer.strip()
    if len(gold) == 1 and gold.upper() in LETTERS[:len(s.choices or [])]:
        return LETTERS.index(gold.upper())
    return choice_index(gold, s.choices) if s.choices else None


def mathvista_normalize(extraction: str, s: Sample) -> Optional[str]:
    """MathVista's own normalisation of an extracted answer (calculate_score.py): multiple choice ->
    the option text ("(x)" and a capital letter map by position, anything else to the option at the
    smallest edit distance); integer -> str(int(float)); float -> rounded to `precision`; list -> str.
    An empty multiple-choice extraction is None (wrong), MathVista's --ignore_empty_extractions."""
    from rapidfuzz.distance import Levenshtein

    if s.choices:
        text = str(extraction).strip()
        if not text:
            return None
        letter = re.findall(r"\(([a-zA-Z])\)", text)
        text = letter[0].upper() if letter else text
        if text in LETTERS[:len(s.choices)]:
            return s.choices[LETTERS.index(text)]
        dist = [Levenshtein.distance(text, c) for c in s.choices]
        return s.choices[dist.index(min(dist))]
    try:
        if s.answer_type == "integer":
            return str(int(float(extraction)))
        if s.answer_type == "float":
            return str(round(float(extraction), int(s.precision or 0)))
    except (TypeError, ValueError):
        return None
    return str(extraction)


def _numeric_text(text: str) -> str:
    """A candidate reduced to its number where it holds exactly one ("14 cm" -> "14"), as MathVista's
    extractor would write it; other text unchanged."""
    t = _clean(text).replace(",", "")
    if _to_float(t) is not None:
        return str(_to_float(t))
    numbers = _NUMBER.findall(t)
    return numbers[0] if len(numbers) == 1 else text


# ---- MATH-Vision's own rule-based evaluation (mathllm/MATH-V, evaluation/), as behaviour -------
_MV_FLAGS = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")


def mathvision_extract(response: str) -> str:
    """MATH-Vision's extraction, step by step: a trailing " C." / " (C)." or a leading "C\\n" is the
    letter; a number after the last "is " wins; without a box, the text after each "the answer is"-
    like phrase (first line, first sentence); with several boxes only the last counts; then
    `mathvision_clean` and the letter clean-ups ("(a)" -> "a")."""
    ans = response.strip()
    for c in "ABCDE":
        if (ans.endswith((f" {c}.", f" ({c}).")) or ans.startswith((f"{c}\n", f"({c})\n", f"({c}) {c}\n"))):
            ans = c
    tail = ans.split("is ")[-1].rstrip(".")
    if _is_float(tail):
        ans = tail
    if "oxed{" not in ans:
        for flag in _MV_FLAGS:
            for variant in (flag, flag.replace("the", "The")):  # each step works on the last result
                before, ans = ans, ans.split(variant)[-1].strip()
                if variant in before:
                    ans = ans.split("\n")[0].split(". ")[0]
    elif ans.count("oxed{") > 1:
        ans = "\\boxed{" + ans.split("oxed{")[-1]
    ans = mathvision_clean(ans)
    for c in "abcde":
        ans = ans.replace(f"({c})", c).replace(f"{{{c}}}", c)
    return ans.rstrip(".").lstrip(":").strip()


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def mathvision_clean(s: str) -> str:
    """MATH-Vision's `find_math_answer`: lower-case; the content of a box (its pattern is greedy:
    from the first "oxed{" to the last "}"), cut at a stray "}"; the value after the last "=" /
    "\\approx"; units, \\text, \\left/\\right, degrees, spaces removed; then `_mathvision_strip`."""
    s = s.lower().replace("{}", "")
    boxed = re.findall(r"oxed{(.*)}", s, re.DOTALL)
    ans = boxed[-1] if boxed else s
    if "}" in ans and ("{" not in ans or ans.find("}") < ans.find("{")):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1].split("\\approx")[-1]
    for old, new in ((" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"),
                     ("\n", ""), ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""),
                     ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""),
                     ("{units}", ""), ("units", ""), ("{km}", ""), ("km", "")):
        ans = ans.replace(old, new)
    return _mathvision_strip(ans)


def _mathvision_strip(s: str) -> str:
    """MATH-Vision's `_strip_string` (a MATH-dataset normaliser). Its quirks are kept: a bare "%"
    stays, and "\\frac12" is braced only when the string also contains "sqrt"."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("$", "")):
        s = s.replace(old, new)
    s = s.split("\\text{ ")[0].replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2:
        s = s.split("=")[-1]
    if len(s.split("\\approx")) == 2:
        s = s.split("\\approx")[-1]
    if "sqrt" in s:
        s = re.sub(r"\\sqrt([^{])", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    if "sqrt" in s:
        s = _brace_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    if m and s == f"{int(m.group(1))}/{int(m.group(2))}":
        s = f"\\frac{{{int(m.group(1))}}}{{{int(m.group(2))}}}"
    return s


def _brace_fracs(s: str) -> str:
    r"""\frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2} (unchanged where a part is missing)."""
    head, *parts = s.split("\\frac")
    out = head
    for part in parts:
        if part.startswith("{"):
            out += "\\frac" + part
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out += "\\frac{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "\\frac{" + part[0] + "}" + part[1:]
    return out


def _mv_number(expr: str) -> float:
    """A LaTeX expression's value rounded to 2 decimals (raises when it has none)."""
    from latex2sympy2_extended import latex2sympy

    return round(float(latex2sympy(expr).evalf()), 2)


def _mv_tuple(s: str) -> str:
    """"(a,b)" / "[a,b]" with two or more elements -> each element's value at 2 decimals."""
    parts = s[1:-1].split(",")
    if len(s) < 2 or len(parts) < 2 or (s[0], s[-1]) not in (("(", ")"), ("[", "]")):
        return s
    try:
        vals = [p if "infty" in p or p in ("a", "-a") else str(_mv_number(p)) for p in parts]
    except Exception:  # any element without a value: compare the text as it is
        return s
    return s[0] + ",".join(vals) + s[-1]


def mathvision_equal(answer: str, gold: str) -> bool:
    """MATH-Vision's `is_equal`: case-insensitive text, then tuples element-wise, then the values
    of both sides (LaTeX read by latex2sympy) equal at 2 decimals. Empty sides are never equal."""
    answer, gold = answer.lower(), gold.lower()
    if not answer.replace(" ", "") or not gold.replace(" ", ""):
        return False
    if answer.strip() == gold.strip() or _mv_tuple(answer) == _mv_tuple(gold):
        return True
    try:
        return _mv_number(_mv_tuple(gold)) == _mv_number(_mv_tuple(answer))
    except Exception:  # no numeric value (free symbols, unparsable): not equal
        return False


def mathvision_correct(extracted: str, s: Sample) -> bool:
    """Right when the extraction equals the gold letter or the gold option's value."""
    value = s.choices[LETTERS.index(s.answer)] if s.choices and s.answer in LETTERS[:len(s.choices)] else ""
    return mathvision_equal(extracted, s.answer) or mathvision_equal(extracted, value)


def free_form_correct(extracted: str, gold: str, gold_parse: str = "latex") -> bool:
    """Exact after cleanup, numbers equal at 2 decimals, then math-verify (train_grpo.math_equal)."""
    from train_grpo import math_equal

    if not extracted:
        return False
    if _clean(extracted) == _clean(gold):
        return True
    a, g = _to_float(extracted), _to_float(gold)
    if a is not None and g is not None:
        return round(a, 2) == round(g, 2)
    return math_equal(gold, f"${extracted.strip().strip('$')}$", gold_parse)


def gold_policy_note(samples: list[Sample]) -> Optional[str]:
    """How many free-form gold answers (those math-verify reads) the two --gold_parse policies read
    differently, as a line to print; None when there are none to check."""
    from train_grpo import gold_parse_report

    free = [s for s in samples if not s.benchmark.startswith(("mathvision", "mathvista")) and not s.choices
            and not re.fullmatch(r"[A-H]", s.answer.strip())]
    return gold_parse_report([s.answer for s in free], "free-form gold answers",
                             [f"{s.benchmark} id={s.id}" for s in free])[1] if free else None


def score_response(response: str, s: Sample, gold_parse: str = "latex") -> tuple[str, bool]:
    """(extracted answer, correct) under the rules of the sample's benchmark (module header)."""
    if s.benchmark.startswith("mathvision"):
        ext = mathvision_extract(response or "")
        return ext, mathvision_correct(ext, s)
    if s.benchmark == "mathvista":
        ext = extract_answer(response, s.choices)
        if not s.choices and s.answer_type in ("integer", "float"):
            ext = _numeric_text(ext)
        pred = mathvista_normalize(ext, s) if (ext or s.choices) else None
        return ext, pred is not None and pred == s.answer
    if s.choices and gold_letter(s) is not None:
        ext = extract_answer(response, s.choices)
        return ext, bool(ext) and LETTERS.index(ext) == gold_letter(s)
    if re.fullmatch(r"[A-H]", s.answer.strip()):  # a letter answer without parsed options (MathVerse)
        k = choice_index(answer_candidate(response), list(LETTERS[:8]))
        ext = LETTERS[k] if k is not None else ""
        return ext, ext == s.answer.strip()
    ext = extract_answer(response)
    return ext, free_form_correct(ext, s.answer, gold_parse)


# =============================================================================================
# 6. LLM scoring, the paper's procedure (the authors' qwen_judge_*_v4.py, in our words)
# =============================================================================================
_FIRST_ANSWER_BLOCK = re.compile(r"<answer>(.+?)</answer>", re.DOTALL)

EXTRACT_TASK = ("Below is a model's response to a math question. Find the final answer the response "
                "gives and copy it, without any explanation, inside <answer> </answer> tags. For a "
                "multiple-choice question give the option letter. If the response gives no answer, "
                "write <answer>null</answer>.")
# Five worked examples (ours): integer, decimal, expression, list, option letter.
EXTRACT_EXAMPLES = (
    ("How many triangles are in the figure?", "Counting the small ones and the two large ones, I get 7 in all.",
     "7"),
    ("What is the length of BC? Round to one decimal place.", "By the Pythagorean theorem BC = sqrt(40) which "
     "is about 6.32, so BC is approximately 6.3.", "6.3"),
    ("Find the area of the circle in terms of pi.", "The radius is 3, therefore the area is $9\\pi$.", "9\\pi"),
    ("Which years had sales above 50? Answer with a list.", "Looking at the bars, 2019 and 2021 exceed 50.",
     "[2019, 2021]"),
    ("Which angle is the largest?\nChoices:\nA. angle P\nB. angle Q\nC. angle R",
     "Angle R faces the longest side, so the answer is C.", "C"),
)


def extract_messages(s: Sample, response: str) -> list[dict]:
    """The extraction request. MathVista and MATH-Vision show the question, MathVerse and WeMath only
    the response (as in the authors' scripts)."""
    shots = "\n\n".join((f"{q}\n\n" if s.extract_question else "") + f"Model response: {r}\n\n"
                        f"Extracted answer: <answer>{a}</answer>" for q, r, a in EXTRACT_EXAMPLES)
    user = (f"{s.extract_question}\n\n" if s.extract_question else "") + f"Model response: {response}\n\nExtracted answer: "
    return [{"role": "system", "content": f"{EXTRACT_TASK}\n\n{shots}"}, {"role": "user", "content": user}]


JUDGE_TASK = ("You grade answers to math questions. Compare the **Response** with the **Ground Truth "
              "Answer** (and the **Choices**, when given). Reply 'true' if the Response is correct and "
              "'false' if it is not, with no explanation.")


def judge_messages(s: Sample, shown: str) -> list[dict]:
    """The true/false request: the choices (when the item has any), the extracted answer, the gold."""
    user = (f"**Choices**: {s.judge_choices}\n" if s.judge_choices else "") + \
        f"**Response**: {shown}\n**Ground Truth Answer**: {s.answer}\n"
    return [{"role": "system", "content": JUDGE_TASK}, {"role": "user", "content": user}]


def parse_verdict(text: Optional[str]) -> Optional[bool]:
    """'true...' -> True, 'false...' -> False, anything else (or no reply) -> None (no verdict)."""
    t = (text or "").strip().strip("*'\"` ").lower()
    return True if t.startswith("true") else False if t.startswith("false") else None


def llm_score(samples: list[Sample], responses: list[str], judge_args: JudgeArgs) -> list[tuple[Optional[str], Optional[bool]]]:
    """(what the judge saw, verdict) per response. The first `<answer>` block is the extraction when
    present; otherwise the LLM extracts (and when its reply has no `<answer>` tags the judge sees the
    whole response, as in the authors' script). A failed request gives no verdict (None)."""
    from judge import make_client

    client = make_client(judge_args)
    sampling = {"temperature": judge_args.temperature, "max_tokens": judge_args.max_tokens}
    shown: list[Optional[str]] = []
    for r in responses:
        m = _FIRST_ANSWER_BLOCK.search(r or "")
        shown.append(m.group(1) if m else None)
    need = [k for k, v in enumerate(shown) if v is None]
    for k, reply in zip(need, client.run_batch([extract_messages(samples[k], responses[k]) for k in need], **sampling)):
        if isinstance(reply, Exception):
            print(f"answer judge: extraction failed for {samples[k].benchmark} id={samples[k].id}: {reply}", file=sys.stderr)
            continue
        m = _FIRST_ANSWER_BLOCK.search(reply.text)
        shown[k] = m.group(1) if m else responses[k]
    ask = [k for k, v in enumerate(shown) if v is not None]
    verdicts: list[Optional[bool]] = [None] * len(samples)
    for k, reply in zip(ask, client.run_batch([judge_messages(samples[k], shown[k]) for k in ask], **sampling)):
        if isinstance(reply, Exception):
            print(f"answer judge: judgement failed for {samples[k].benchmark} id={samples[k].id}: {reply}", file=sys.stderr)
        verdicts[k] = None if isinstance(reply, Exception) else parse_verdict(reply.text)
    return list(zip(shown, verdicts))


# =============================================================================================
# 7. Perception score r_v (judge.py)
# =============================================================================================
def perception_scores(judge, samples: list[Sample], responses: list[str]) -> list[Optional[float]]:
    """r_v per response where the sample has `visual_key_info` (None elsewhere or where the judge
    gave no verdict). The judge sees the whole response text, never the image (paper sec. 3)."""
    idx = [k for k, s in enumerate(samples) if s.visual_key_info and str(s.visual_key_info).strip()]
    out: list[Optional[float]] = [None] * len(samples)
    if not idx or judge is None:
        return out
    scores = judge.score([samples[k].visual_key_info for k in idx], [responses[k] for k in idx])
    for k, r in zip(idx, scores):
        out[k] = None if r is None else float(r)
    return out


def perception_score(response: str, s: Sample, frame: Optional[list] = None) -> dict:
    """The sister paper's metrics of one perception answer: grounding Acc@0.5 (IoU of the first
    box, `iou`), counting the exact count, OCR the exact text (and `edit_distance`), detection
    every object found and nothing else (and `detections`, back in the original image's pixels,
    for COCO AP). `frame` = (original w, h, resized w, h): the model answers in pixels of the
    resized image (1:1 when unknown)."""
    import perception_rewards as pr
    from train_grpo import task_correct

    sx, sy = (frame[2] / frame[0], frame[3] / frame[1]) if frame else (1.0, 1.0)
    row = {"task": s.task, "answer": s.answer, "classes": s.classes, "problem": s.problem,
           "_scale": (sx, sy, frame[2] if frame else 0, frame[3] if frame else 0)}
    if s.task == "grounding":
        boxes = pr.parse_boxes(response)
        gold = json.loads(s.answer)
        iou = pr.box_iou(boxes[0][0], [gold[0] * sx, gold[1] * sy, gold[2] * sx, gold[3] * sy]) if boxes else 0.0
        return {"extracted": boxes[0][0] if boxes else "", "correct": iou >= 0.5, "iou": iou}
    if s.task == "counting":
        n = pr.predicted_count(response)
        return {"extracted": n, "correct": n == s.meta.get("count", len(json.loads(s.answer)))}
    if s.task == "ocr":
        d = pr.ocr_edit_distance(response.strip(), s.answer)
        return {"extracted": response.strip(), "correct": d == 0.0, "edit_distance": d}
    preds = [[b[0] / sx, b[1] / sy, b[2] / sx, b[3] / sy, label] for b, label in
             pr.detection_predictions(response, s.classes)]
    return {"extracted": len(preds), "correct": task_correct("detection", response, row), "detections": preds}


def detection_ap(rows: list[dict]) -> dict[str, float]:
    """COCO AP, AP50, AP75 (pycocotools) of the rows' detections against their gold boxes; every
    predicted box scores 1.0, as in the sister paper's evaluation."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = sorted({o["label"] for r in rows for o in json.loads(r["gold"])} |
                   {d[4] for r in rows for d in r.get("detections", [])})
    cat = {n: k + 1 for k, n in enumerate(names)}
    gt, dets = COCO(), []
    gt.dataset = {"images": [{"id": i} for i in range(len(rows))], "categories": [{"id": v} for v in cat.values()],
                  "annotations": []}
    for i, r in enumerate(rows):
        for o in json.loads(r["gold"]):
            x1, y1, x2, y2 = o["bbox_2d"]
            gt.dataset["annotations"].append({"id": len(gt.dataset["annotations"]) + 1, "image_id": i, "iscrowd": 0,
                                              "category_id": cat[o["label"]], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                              "area": (x2 - x1) * (y2 - y1)})
        dets += [{"image_id": i, "category_id": cat[d[4]], "bbox": [d[0], d[1], d[2] - d[0], d[3] - d[1]],
                  "score": 1.0} for d in r.get("detections", [])]
    gt.createIndex()
    if not dets:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):  # PLUMBING: pycocotools prints its whole table
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"AP": float(evaluator.stats[0]), "AP50": float(evaluator.stats[1]), "AP75": float(evaluator.stats[2])}


def score_rows(samples: list[Sample], responses: list[str], scoring: str, gold_parse: str,
               answer_judge: JudgeArgs, judge=None, frames: Optional[list] = None) -> list[dict]:
    """Scores per (sample, response): `correct` is the headline of `scoring` (rule, llm, or both:
    the rule first), with `correct_rule` / `correct_llm` and their extractions; `r_v` when judged.
    Perception-task samples get the sister paper's metrics (perception_score) instead."""
    rows = []
    for k, (s, resp) in enumerate(zip(samples, responses)):
        if s.task != "geometry":
            rows.append(perception_score(resp, s, frames[k] if frames else None))
            continue
        ext, ok = score_response(resp, s, gold_parse)
        rows.append({"extracted": ext, "correct_rule": ok} if scoring != "llm" else {})
    maths = [k for k, s in enumerate(samples) if s.task == "geometry"]
    if scoring in ("llm", "both") and maths:
        judged = llm_score([samples[k] for k in maths], [responses[k] for k in maths], answer_judge)
        for k, (shown, ok) in zip(maths, judged):
            rows[k].update({"extracted_llm": shown, "correct_llm": ok})
    for k in maths:
        rows[k]["correct"] = rows[k]["correct_llm"] if scoring == "llm" else rows[k]["correct_rule"]
        rows[k]["extracted"] = rows[k].get("extracted", rows[k].get("extracted_llm"))
    for row, rv in zip(rows, perception_scores(judge, samples, responses)):
        row["r_v"] = rv
    return rows


# =============================================================================================
# 8. Reports
# =============================================================================================
BREAKDOWNS = {"mathvista": ("task", "skills"), "mathvision": ("subject", "level"),
              "mathvision_testmini": ("subject", "level"), "mathverse": ("problem_version",)}


def _mean(xs: list) -> Optional[float]:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(rows: list[dict], skipped: Optional[dict] = None) -> dict:
    """Per benchmark: n, accuracy (the headline scoring), accuracy_rule / accuracy_llm when present,
    mean r_v (over annotated rows with a verdict) and breakdowns by the benchmark's categories."""
    summary: dict = {}
    # a benchmark whose rows were all skipped (no images) still gets an entry with n = 0
    for bench in sorted({r["benchmark"] for r in rows} | set(k for k, v in (skipped or {}).items() if v)):
        rs = [r for r in rows if r["benchmark"] == bench]
        entry: dict = {"n": len(rs), "accuracy": _mean([r.get("correct") for r in rs])}
        for kind in ("rule", "llm"):
            if any(f"correct_{kind}" in r for r in rs):
                entry[f"accuracy_{kind}"] = _mean([r.get(f"correct_{kind}") for r in rs])
        if any("correct_llm" in r for r in rs):
            entry["llm_no_verdict"] = sum(r.get("correct_llm") is None for r in rs)
        if any("iou" in r for r in rs):
            entry["mean_iou"] = _mean([r.get("iou") for r in rs])
        if any("edit_distance" in r for r in rs):
            entry["edit_distance"] = _mean([r.get("edit_distance") for r in rs])
        if any("detections" in r for r in rs):
            entry.update(detection_ap(rs))
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


PROTOCOLS = {"training": "training prompt (problem + instruction, images where <image> stands), training image "
                         "bounds", "paper": "the authors' evaluation scripts (their question text per benchmark, "
                         "image first, greedy, 4,096 tokens, 3,136-12,845,056 pixels)"}
SCORINGS = {"rule": "rule-based (strict extraction; MathVista/MATH-Vision official rules; math-verify)",
            "llm": "LLM judge, the paper's procedure (<answer> block or LLM extraction, then true/false)",
            "both": "rule-based headline, LLM judge alongside"}


def task_metrics_text(entry: dict) -> str:
    """The sister paper's extra metrics of a benchmark entry (accuracy is Acc@0.5 for grounding,
    the exact count, the exact text for OCR, every object found for detection)."""
    parts = [f"mean IoU {entry['mean_iou']:.3f}"] if entry.get("mean_iou") is not None else []
    parts += [f"edit distance {entry['edit_distance']:.3f}"] if entry.get("edit_distance") is not None else []
    parts += [f"AP {100 * entry['AP']:.1f} / AP50 {100 * entry['AP50']:.1f}"] if "AP" in entry else []
    return ", ".join(parts) or "-"


def markdown_report(summary: dict, title: str = "Evaluation", protocol: str = "training", scoring: str = "rule",
                    judge_model: Optional[str] = None) -> str:
    head = scoring if scoring != "both" else "rule"
    lines = [f"# {title}", "", f"Protocol: **{protocol}**: {PROTOCOLS.get(protocol, protocol)}.  ",
             f"Scoring: **{scoring}**: {SCORINGS.get(scoring, scoring)}"
             + (f"; answer judge `{judge_model}`" if scoring != "rule" and judge_model else "") + ".", "",
             f"| benchmark | n | accuracy % ({head}) | rule % | LLM % | no LLM verdict | r_v (n) | task metrics |",
             "|---|---|---|---|---|---|---|---|"]
    for bench, e in summary.items():
        lines.append(f"| {bench} | {e['n']} | {_pct(e['accuracy'])} | {_pct(e.get('accuracy_rule'))} | "
                     f"{_pct(e.get('accuracy_llm'))} | {e.get('llm_no_verdict', '-')} | {_fmt(e['r_v'])} ({e['r_v_n']}) | "
                     f"{task_metrics_text(e)} |")
    for bench, e in summary.items():
        for key in [k for k in e if k.startswith("by_")]:
            lines += ["", f"## {bench} by {key[3:]} ({head} scoring)", "", f"| {key[3:]} | n | accuracy % |",
                      "|---|---|---|"]
            lines += [f"| {k} | {v['n']} | {_pct(v['accuracy'])} |" for k, v in e[key].items()]
    return "\n".join(lines) + "\n"


def plot_runs(summaries: dict[str, dict], path: str | Path, ylabel: str = "accuracy (%)") -> None:
    """Grouped bar chart: accuracy per benchmark, one bar per run."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    benches = sorted({b for s in summaries.values() for b in s})
    fig = Figure(figsize=(max(4, 1.5 * len(benches) + 1), 3.5))
    ax = fig.subplots()
    width = 0.8 / max(1, len(summaries))
    for k, (run, s) in enumerate(summaries.items()):
        vals = [100 * (s.get(b, {}).get("accuracy") or 0) for b in benches]
        ax.bar([i + k * width for i in range(len(benches))], vals, width, label=run)
    ax.set_xticks([i + width * (len(summaries) - 1) / 2 for i in range(len(benches))], benches)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def eval_main(args: EvalArgs) -> dict:
    from judge import build_judge, make_client

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = dict(item.split("=", 1) for item in args.data)
    samples = []
    for name in args.benchmarks:
        if name not in BENCHMARKS and name not in sources:
            raise ValueError(f"unknown benchmark '{name}': use one of {BENCHMARK_NAMES} or pass --data {name}=FILE")
        samples += load_benchmark(name, sources.get(name), args.limit)
    if (note := gold_policy_note(samples)) is not None:
        print(note)
    # judges are checked before any generation (an unreachable server fails now, naming the URL)
    if args.scoring != "rule" and args.answer_judge.health_check:
        make_client(args.answer_judge).health_check()
    judge = build_judge(args.judge) if args.perception and args.judge.backend != "vllm" else None
    gen_path = out / "generations.jsonl"
    counts = generate(args, samples, gen_path)
    if args.perception and judge is None:  # an in-process judge engine only after the policy's is gone
        judge = build_judge(args.judge)
    generated = {(r["benchmark"], str(r["id"])): r for r in data.read_jsonl(gen_path)}
    mixed = {r.get("protocol", "training") for r in generated.values()} - {args.protocol}
    if mixed:
        raise ValueError(f"{gen_path} holds responses of protocol {sorted(mixed)}, not {args.protocol!r}: "
                         "use another --output_dir")
    have = [s for s in samples if (s.benchmark, s.id) in generated]
    skipped = collections.Counter(s.benchmark for s in samples if (s.benchmark, s.id) not in generated)
    responses = [generated[(s.benchmark, s.id)]["response"] for s in have]
    frames = [generated[(s.benchmark, s.id)].get("frame") for s in have]
    scores = score_rows(have, responses, args.scoring, args.gold_parse, args.answer_judge, judge, frames)
    rows = [{"benchmark": s.benchmark, "id": s.id, "prompt": generated[(s.benchmark, s.id)]["prompt"],
             "response": r, "gold": s.answer, "protocol": args.protocol, "scoring": args.scoring, **sc, "meta": s.meta}
            for s, r, sc in zip(have, responses, scores)]
    data.write_jsonl(out / "samples.jsonl", rows)
    summary = summarize(rows, dict(skipped))
    judge_model = args.answer_judge.model if args.scoring != "rule" else None
    (out / "summary.json").write_text(json.dumps({"protocol": args.protocol, "scoring": args.scoring,
                                                  "answer_judge": judge_model, "model": args.model,
                                                  "counts": counts, "benchmarks": summary}, indent=2))
    (out / "report.md").write_text(markdown_report(summary, f"Evaluation of {args.model}", args.protocol,
                                                   args.scoring, judge_model))
    plot_runs({out.name: summary}, out / "accuracy.png", f"accuracy (%), {args.protocol} / {args.scoring}")
    for bench, e in summary.items():
        print(f"{bench}: n={e['n']} accuracy={_pct(e['accuracy'])}% ({args.protocol} protocol, {args.scoring} scoring)"
              + (f" skipped(no image)={skipped[bench]}" if skipped[bench] else ""))
    return summary


# =============================================================================================
# 9. Re-scoring published responses
# =============================================================================================
def score_main(args: ScoreArgs) -> list[dict]:
    samples = load_benchmark(args.benchmark, args.data, split=args.split)
    by_id = {s.id: s for s in samples}
    id_field = BENCHMARKS.get(args.benchmark, BENCHMARKS["local"])[3]
    rows = data.read_jsonl(args.responses)
    matched = []
    for n, row in enumerate(rows, 1):
        rid = row.get(id_field, row.get("id", row.get("pid")))
        if rid is None or str(rid) not in by_id:
            raise data.RowError(f"{args.responses}: line {n}: id {rid!r} (field '{id_field}') not in {args.data}")
        matched.append(by_id[str(rid)])
    if (note := gold_policy_note(samples)) is not None:
        print(note)
    scores = score_rows(matched, [r.get("response") or "" for r in rows], args.scoring, args.gold_parse,
                        args.answer_judge)
    if args.extraction_field and args.scoring != "llm":  # MathVista's rules on a provided extraction
        if args.benchmark != "mathvista":
            raise ValueError("--extraction_field applies MathVista's rules: use it with --benchmark mathvista")
        for n, (row, sc, s) in enumerate(zip(rows, scores, matched), 1):
            if args.extraction_field not in row:
                raise data.RowError(f"{args.responses}: line {n}: no field '{args.extraction_field}'")
            ext = "" if row[args.extraction_field] is None else str(row[args.extraction_field])
            sc.update(extracted=ext, correct_rule=official_mathvista_verdict(ext, s))
            sc["correct"] = sc["correct_rule"] if args.scoring == "rule" else sc["correct"]
    out = [{**row, **sc, "scoring": args.scoring} for row, sc in zip(rows, scores)]
    data.write_jsonl(args.output, out)
    per_model: dict = collections.defaultdict(list)
    for row in out:
        per_model[row.get("model", "all")].append(row["correct"])
    for model, xs in sorted(per_model.items(), key=lambda kv: -(_mean(kv[1]) or 0)):
        print(f"{model:40s} n={len(xs):4d} accuracy={_pct(_mean(xs))}% ({args.scoring} scoring)")
    # MathVista's released responses carry the authors' own (GPT) `extraction`: MathVista's rules
    # applied to it are the official verdict; agreement with it measures our extraction
    if args.benchmark == "mathvista" and not args.extraction_field:
        with_ext = [(row, s) for row, s in zip(out, matched) if row.get("extraction") is not None]
        if with_ext:
            agree = sum(official_mathvista_verdict(str(r["extraction"]), s) == r["correct"] for r, s in with_ext)
            print(f"verdict agreement with MathVista's rules on the provided `extraction`: {agree}/{len(with_ext)} "
                  f"= {_pct(agree / len(with_ext))}%")
    return out


def official_mathvista_verdict(extraction: str, s: Sample) -> bool:
    """MathVista's own verdict for an extraction made by its GPT extractor: normalise (empty
    extractions map to the nearest option, the script's default), compare with the answer."""
    if s.choices and not extraction.strip():
        from rapidfuzz.distance import Levenshtein

        dist = [Levenshtein.distance("", c) for c in s.choices]
        return s.choices[dist.index(min(dist))] == s.answer
    return mathvista_normalize(extraction, s) == s.answer


# =============================================================================================
# 10. McNemar comparison
# =============================================================================================
def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: under H0 the b + c discordant pairs split Binomial(n, 1/2);
    p = min(1, 2 * P[X <= min(b, c)]), computed by scipy's exact binomial test.

    >>> round(mcnemar_exact(2, 10), 4)
    0.0386
    """
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(min(b, c), b + c, 0.5).pvalue)


def _run_rows(run: str) -> tuple[dict[tuple[str, str], dict], dict]:
    """(rows by (benchmark, id), {"protocol", "scoring"}) of a run folder or a samples file."""
    path = Path(run)
    path = path / "samples.jsonl" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no samples.jsonl for run {run}")
    rows = data.read_jsonl(path)
    info = {k: sorted({str(r.get(k, "unknown")) for r in rows}) for k in ("protocol", "scoring")}
    return {(r["benchmark"], str(r["id"])): r for r in rows}, {k: "+".join(v) for k, v in info.items()}


def paired_counts(a: list[bool], b: list[bool]) -> tuple[int, int]:
    """(b, c): pairs where only A is correct, pairs where only B is correct."""
    return sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))


def compare_main(args: CompareArgs) -> dict:
    (ra, info_a), (rb, info_b) = _run_rows(args.run_a), _run_rows(args.run_b)
    if info_a != info_b:
        msg = (f"the runs were not evaluated alike: A = {info_a}, B = {info_b}; their accuracies are not "
               "comparable")
        if not args.allow_mixed:
            raise SystemExit(f"compare: {msg} (pass --allow_mixed to compare anyway)")
        print(f"warning: {msg}", file=sys.stderr)
    keys = sorted(set(ra) & set(rb))
    result = {"n_paired": len(keys), "a": info_a, "b": info_b}
    print(f"A: {info_a['protocol']} protocol, {info_a['scoring']} scoring; B: {info_b['protocol']} protocol, "
          f"{info_b['scoring']} scoring")
    print(f"paired samples: {len(keys)} (only in A: {len(set(ra) - set(rb))}, only in B: {len(set(rb) - set(ra))})")
    pk = [k for k in keys if ra[k].get("r_v") is not None and rb[k].get("r_v") is not None]
    for what, ks, f in (("answer", [k for k in keys if ra[k].get("correct") is not None
                                    and rb[k].get("correct") is not None], lambda r: bool(r["correct"])),
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


SUBCOMMANDS = {"eval": (EvalArgs, eval_main), "score": (ScoreArgs, score_main), "compare": (CompareArgs, compare_main)}


def main(argv: Optional[list[str]] = None) -> Any:
    args = tyro.extras.subcommand_cli_from_dict({name: cls for name, (cls, _) in SUBCOMMANDS.items()},
                                                args=argv, prog="evaluate.py", description=__doc__)
    return next(fn for cls, fn in SUBCOMMANDS.values() if isinstance(args, cls))(args)


if __name__ == "__main__":
    data.quiet_libraries()
    main()
