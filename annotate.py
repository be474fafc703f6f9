r"""Build Perception-R1 training data: distil solutions, keep the correct ones, extract visual facts.

What it does
    Three resumable stages turn plain problems (image + question + gold answer) into rows in the
    training schema (`problem` with `<image>`, `answer`, `images`, `visual_key_info`):
      distil   a strong multimodal model (any OpenAI-compatible API; the image goes inline as a
               base64 PNG data URL) writes k step-by-step solutions per problem, each ending in
               \boxed{}                                             -> <output_dir>/distil.jsonl
      filter   a problem is kept when at least one solution is correct, judged by
               train_grpo.accuracy_reward, the very scorer training uses -> filter.jsonl
      extract  a text-only LLM reads problem + correct solution and lists the atomic visual facts
               it relies on, one per `<infoK>` tag; the reply is validated and normalised
               (renumbered 1..m, empty and duplicate facts dropped)  -> extract.jsonl,
               then the finished rows are exported to train.jsonl + train.parquet
    `all` runs the three in order. Every stage appends one record per problem to its own JSONL
    file and flushes it, so a killed run loses only the requests in flight; a re-run skips keys
    that are done. Bad rows (missing/unreadable image, missing answer, a problem with no facts)
    become records with `status: "error"` and the reason naming the row; the run goes on.

Papers
    Perception-R1 (Xiao et al., arXiv 2506.07218), method section "visual annotation", steps 1-3:
    CoT distillation (Gemini-2.5-Pro), accuracy filter (Geometry3K train 2,101 -> 1,442 kept),
    annotation extraction (Qwen2.5-32B-Instruct).

Code map (section -> paper step -> function)
    0. Args              -> every option, paper defaults                   -> Args
    1. Input rows        -> the problems (HF id or local JSONL/parquet)    -> load_problems, prepare_problem
    2. Distil            -> step 1, CoT distillation                       -> distil_messages, run_distil
    3. Filter            -> step 2, keep correct trajectories              -> choose_solution, run_filter
    4. Extract           -> step 3, atomic visual facts v1..vm             -> extract_messages,
                                                                              normalise_facts, run_extract
    5. Export            -> training schema, JSONL + parquet               -> export
    6. Stage files       -> resumable append-only records                  -> latest_records, StageBar
    7. CLI               -> `annotate.py distil|filter|extract|all`        -> main

Deviations from the paper
    1. The prompts are our own words. The distillation prompt is the training prompt
       (data.build_messages: problem + data.INSTRUCTION) plus one sentence asking the model to
       state each diagram fact before using it, so that solutions are in the training format and
       the extractor has the facts to read.
    2. k solutions per problem (default 1, which we assume the paper used; it does not say);
       with k > 1 the first correct one in request order is kept.
    3. Extraction output is validated: tags are renumbered in order of appearance, unnumbered
       `<info>` tags are accepted, empty and duplicate (case/space-insensitive) facts dropped.
       A reply with no fact at all is an error record, not a dropped row. The paper reports a
       96% human-checked accuracy for its annotations; we have no such check here.
    4. Images are sent resized to Qwen2.5-VL's grid within [min_pixels, max_pixels] (the policy's
       own view of the diagram); the originals are saved as PNG next to the output so the
       exported rows are self-contained.
    5. Token counts in the progress bar come from the server's `usage` field when it sends one
       (judge.ChatClient returns them with each reply), else the bar counts reply characters.
    6. The filter is the training scorer (train_grpo.accuracy_reward) with the same gold policy
       (`--gold_parse`). Under the official policy a bare-LaTeX gold answer such as Geometry3K's
       "5 \sqrt { 3 }" is read as its trailing number 3: a *wrong* solution ending in \boxed{3} is
       kept and a right one ending in \boxed{5\sqrt{3}} is dropped. The default ("latex") reads it
       as 5*sqrt(3). summary.json counts the gold answers the two policies read differently
       (`filter/gold_read_differently`), and filter.jsonl flags gold answers that do not even
       match themselves (`gold_parsable: false`, counted in `filter/gold_unparsable`).

Launch
    # CPU smoke test against any local OpenAI-compatible server (e.g. the tests' fake server):
    python annotate.py all --input demo_data/train.jsonl --limit 8 --output-dir runs/annot \
        --distil-base-urls http://127.0.0.1:8000/v1 --distil-model tiny \
        --extract-base-urls http://127.0.0.1:8000/v1 --extract-model tiny
    # paper setup: Gemini via its OpenAI-compatible endpoint, Qwen2.5-32B served by `vllm serve`
    GEMINI_API_KEY=... python annotate.py all --input hiyouga/geometry3k --split train \
        --output-dir data/pr1_geo3k \
        --distil-base-urls https://generativelanguage.googleapis.com/v1beta/openai \
        --distil-model gemini-2.5-pro --distil-api-key-env GEMINI_API_KEY \
        --extract-base-urls http://gpu1:8000/v1 http://gpu2:8000/v1 \
        --extract-model Qwen/Qwen2.5-32B-Instruct
    # one stage at a time (each reads the previous stage's file in --output-dir):
    python annotate.py distil  --input hiyouga/geometry3k --output-dir data/pr1_geo3k ...
    python annotate.py filter  --output-dir data/pr1_geo3k
    python annotate.py extract --output-dir data/pr1_geo3k --extract-base-urls ... --extract-model ...
    # a local file with one `image` column and an `id` column:
    python annotate.py all --input ../shared/data/geometry3k/geometry3k_slice.jsonl --image-field image ...
    # the extractor on GPUs (paper: Qwen2.5-32B-Instruct), one server per node, then --extract-base-urls:
    vllm serve Qwen/Qwen2.5-32B-Instruct --tensor-parallel-size 4 --enable-prefix-caching
    # then train on it: the output folder's train.parquet (or train.jsonl) is the training data file
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import io
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import tyro

import data
from judge import ChatClient, Reply, format_facts, split_annotations



# =============================================================================================
# 0. Args
# =============================================================================================
@dataclasses.dataclass
class Args:
    """Options of every stage (one source of truth; a stage ignores the ones it does not use)."""

    # --- input ---
    input: str = "hiyouga/geometry3k"
    """problems: a Hugging Face dataset id or a local .jsonl/.json/.parquet file (paper: Geometry3K
    train, 2,101 problems). Relative image paths of a local file are resolved against its folder"""
    split: str = "train"
    """dataset split when `input` is a Hugging Face id (paper: train)"""
    limit: Optional[int] = None
    """use only the first N input rows (None = all)"""
    problem_field: str = "problem"
    """input column with the question text (hiyouga/geometry3k: problem)"""
    answer_field: str = "answer"
    """input column with the gold answer (hiyouga/geometry3k: answer)"""
    images_field: str = "images"
    """input column with a list of images (paths, {"bytes","path"} dicts or PIL images;
    hiyouga/geometry3k: images)"""
    image_field: Optional[str] = None
    """input column with ONE image per row (e.g. "image" in the Geometry3K slice); when set it is
    used instead of `images_field`"""
    id_field: str = "id"
    """input column with a stable row id; rows without it are keyed by their position. The key
    decides what a re-run skips, so keep `input`/`limit` fixed across resumes when ids are absent"""
    output_dir: str = "annotations"
    """folder for the stage files (distil/filter/extract.jsonl), saved images, train.jsonl/.parquet
    and summary.json"""

    # --- stage 1: distillation (multimodal model) ---
    distil_model: str = "gemini-2.5-pro"
    """served name of the solving model (paper: Gemini-2.5-Pro)"""
    distil_base_urls: tuple[str, ...] = ("http://127.0.0.1:8000/v1",)
    """OpenAI-compatible base URL(s) ending in /v1 (several are load-balanced)"""
    distil_api_key_env: str = "DISTIL_API_KEY"
    """NAME of the environment variable holding the API key (never the key itself; unset -> "EMPTY")"""
    k: int = 1
    """solutions requested per problem (>= 1). The paper does not say; 1 is our assumption"""
    distil_temperature: float = 1.0
    """sampling temperature of the solver (ours; >0 so k > 1 gives different solutions)"""
    distil_max_tokens: int = 4096
    """max new tokens per solution (the policy's response budget in the official script)"""
    min_pixels: int = data.PAPER_MIN_PIXELS
    """images are resized to the Qwen2.5-VL grid with at least this many pixels before sending
    (official training script: 3,136)"""
    max_pixels: int = data.PAPER_MAX_PIXELS
    """... and at most this many (official training script: 1,806,336)"""

    # --- stage 2: filter ---
    answer_dotall: bool = False
    """passed to train_grpo.accuracy_reward: False = the official (non-DOTALL) answer regex, i.e.
    exactly what training rewards"""
    gold_parse: str = "latex"
    """how the gold answer is read (train_grpo --gold_parse): "latex" = bare LaTeX parsed as math
    (ours), "official" = parsed as stored (the official code; misreads "5 \\sqrt { 3 }" as 3)"""

    # --- stage 3: extraction (text model) ---
    extract_model: str = "Qwen/Qwen2.5-32B-Instruct"
    """served name of the fact extractor (paper: Qwen2.5-32B-Instruct)"""
    extract_base_urls: tuple[str, ...] = ("http://127.0.0.1:8000/v1",)
    """OpenAI-compatible base URL(s) ending in /v1"""
    extract_api_key_env: str = "EXTRACT_API_KEY"
    """NAME of the environment variable holding the extractor's API key (unset -> "EMPTY")"""
    extract_temperature: float = 0.0
    """extractor temperature (ours: 0, deterministic)"""
    extract_max_tokens: int = 1024
    """max new tokens of one extraction reply (ours)"""

    # --- requests (judge.ChatClient) ---
    max_concurrency: int = 32
    """requests in flight at once, per stage (ours; size it to the servers / API quota)"""
    timeout_s: float = 300.0
    """seconds per request attempt (ours; long CoTs from a large model take minutes)"""
    max_retries: int = 4
    """retries after the first attempt on connection errors, timeouts, 5xx and 429 (ours)"""
    chunk_rows: int = 128
    """problems prepared per batch (images encoded in memory at once); results are appended as
    each problem finishes, not per chunk"""
    redo_errors: bool = False
    """re-run also problems whose latest record is a data error (bad image, no facts). Failed
    requests (server down, timeouts) are always retried on a re-run"""

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if self.image_field is not None and not self.image_field:
            raise ValueError("--image-field must be a column name")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.max_concurrency < 1 or self.chunk_rows < 1:
            raise ValueError("--max-concurrency and --chunk-rows must be >= 1")


def now() -> str:
    """UTC timestamp for provenance fields."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# =============================================================================================
# 6. Stage files: append-only records, the latest record per key wins
# =============================================================================================
def stage_path(args: Args, stage: str) -> Path:
    return Path(args.output_dir) / f"{stage}.jsonl"


def latest_records(path: Path) -> dict[str, dict]:
    """key -> latest record of a stage file (a truncated last line from a kill is ignored)."""
    out: dict[str, dict] = {}
    for rec in data.read_jsonl(path):
        out[rec["key"]] = rec
    return out


def is_done(rec: dict | None, redo_errors: bool) -> bool:
    """A key needs no new record if it has one that is ok, or a data error we do not redo.
    Failed requests (`retryable`) are always redone."""
    if rec is None:
        return False
    if rec.get("status") == "ok":
        return True
    return not rec.get("retryable", False) and not redo_errors


def error_record(base: dict, stage: str, reason: str, retryable: bool = False) -> dict:
    return {**base, "status": "error", "stage": stage, "error": reason, "retryable": retryable,
            f"{stage}_at": now()}


def make_client(base_urls, model, api_key_env, args: Args) -> ChatClient:
    return ChatClient(base_urls, model, api_key_env=api_key_env, max_concurrency=args.max_concurrency,
                      timeout_s=args.timeout_s, max_retries=args.max_retries)


class StageBar:
    """tqdm bar over problems: rate and ETA from tqdm; tokens (or characters) and errors as postfix."""

    def __init__(self, stage: str, total: int, done: int, client: ChatClient | None = None):
        from tqdm import tqdm

        self.client = client
        self.chars = 0
        self.errors = 0
        self.bar = tqdm(total=total, initial=done, desc=stage, unit="row", dynamic_ncols=True)

    def update(self, n: int = 1, chars: int = 0, error: bool = False) -> None:
        self.chars += chars
        self.errors += int(error)
        post = {"errors": self.errors}
        counts = self.client.counts if self.client is not None else {}
        if counts.get("completion_tokens"):
            post["tok_in"] = counts["prompt_tokens"]
            post["tok_out"] = counts["completion_tokens"]
        elif self.client is not None:
            post["chars_out"] = self.chars
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


# =============================================================================================
# 1. Input rows
# =============================================================================================
def load_problems(args: Args) -> list[dict]:
    """Input rows, each with `_index` (position) and `_key` (id if present, else position)."""
    rows = data.load_rows(args.input, split=args.split, limit=args.limit)
    for row in rows:
        rid = row.get(args.id_field)
        row["_key"] = str(rid) if rid is not None and str(rid) != "" else f"#{row['_index']}"
    # Two rows with one key would overwrite each other's images and one would be skipped as done.
    seen: dict[str, int] = {}
    for row in rows:
        if row["_key"] in seen:
            raise ValueError(f"{args.input}: rows {seen[row['_key']]} and {row['_index']} share the id "
                             f"{row['_key']!r} in column '{args.id_field}'; pass --id-field '' to key "
                             f"rows by position instead")
        seen[row["_key"]] = row["_index"]
    return rows


def _base_dir(args: Args) -> Path | None:
    """Folder that relative image paths of a local file are relative to (load_rows resolves only
    the `images` column; a single `image` column is resolved here)."""
    p = Path(args.input)
    return p.parent.resolve() if p.exists() else None


def prepare_problem(row: dict, args: Args, image_dir: Path) -> dict:
    """Normalise one input row to the schema and save its images as PNG under `image_dir`.

    Returns {key, index, id, problem, answer, images (paths relative to output_dir), pil}.
    Raises data.RowError (naming the row) for a missing answer/problem or a bad image.
    """
    images = [row.get(args.image_field)] if args.image_field else row.get(args.images_field)
    if images is None or (args.image_field and row.get(args.image_field) is None):
        raise data.RowError(f"{data.row_name(row)}: missing field "
                            f"'{args.image_field or args.images_field}'")
    if not isinstance(images, (list, tuple)):
        images = [images]
    problem = row.get(args.problem_field)
    answer = row.get(args.answer_field)
    n_slots = len(images)
    if isinstance(problem, str) and data.IMAGE_PLACEHOLDER not in problem:
        problem = data.IMAGE_PLACEHOLDER * n_slots + problem  # training prompts carry <image>
    rec = {"id": row.get(args.id_field), "_index": row["_index"], "problem": problem,
           "answer": None if answer is None else str(answer), "images": list(images)}
    data.check_row(rec)  # missing/empty problem or answer, no images, placeholder count
    name = data.row_name(rec)
    pil, rel = [], []
    for j, img in enumerate(images):
        im = data.open_image(img, f"{name}: field '{args.image_field or args.images_field}'[{j}]",
                             base_dir=_base_dir(args))
        fname = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{row['_key']}_{j}") + ".png"
        image_dir.mkdir(parents=True, exist_ok=True)
        im.save(image_dir / fname)
        pil.append(data.resize_image(im, args.min_pixels, args.max_pixels))
        rel.append(f"{image_dir.name}/{fname}")
    return {"key": row["_key"], "index": row["_index"], "id": rec["id"], "problem": problem,
            "answer": rec["answer"], "images": rel, "pil": pil}


def image_data_url(img) -> str:
    """A PIL image as an inline `data:image/png;base64,...` URL (OpenAI `image_url` content)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# =============================================================================================
# 2. Distil: k step-by-step solutions per problem (paper step 1)
# =============================================================================================
# Our addition to the training instruction: facts stated explicitly are what step 3 extracts.
DISTIL_HINT = ("Whenever you use something shown in the diagram (a length, an angle, a parallel or "
               "perpendicular pair, a point on a line or circle), state it explicitly first.")


def distil_messages(problem: str, images: Sequence) -> list[dict]:
    """The training prompt (data.build_messages) in OpenAI wire format: each image slot becomes an
    `image_url` part carrying the PNG inline as a base64 data URL."""
    msgs = data.build_messages(problem, len(images), f"{data.INSTRUCTION}\n{DISTIL_HINT}")
    content, k = [], 0
    for part in msgs[0]["content"]:
        if part["type"] == "image":
            content.append({"type": "image_url", "image_url": {"url": image_data_url(images[k])}})
            k += 1
        else:
            content.append(part)
    return [{"role": "user", "content": content}]


def run_distil(args: Args) -> dict:
    """Append one record per problem to distil.jsonl: the k solutions, or an error."""
    path = stage_path(args, "distil")
    rows = load_problems(args)
    done = latest_records(path)
    todo = [r for r in rows if not is_done(done.get(r["_key"]), args.redo_errors)]
    client = make_client(args.distil_base_urls, args.distil_model, args.distil_api_key_env, args)
    bar = StageBar("distil", len(rows), len(rows) - len(todo), client)
    sampling = {"temperature": args.distil_temperature, "max_tokens": args.distil_max_tokens}
    image_dir = Path(args.output_dir) / "images"
    with data.open_for_append(path) as fh:
        for start in range(0, len(todo), args.chunk_rows):
            chunk, batch, owners = [], [], []
            for row in todo[start:start + args.chunk_rows]:
                base = {"key": row["_key"], "index": row["_index"], "id": row.get(args.id_field)}
                try:
                    prob = prepare_problem(row, args, image_dir)
                except data.RowError as e:  # bad row: recorded with its reason, the run goes on
                    data.append_jsonl(fh, error_record(base, "distil", str(e)))
                    bar.update(error=True)
                    continue
                msgs = distil_messages(prob["problem"], prob.pop("pil"))
                chunk.append({**prob, "replies": [None] * args.k, "left": args.k})
                for j in range(args.k):
                    batch.append(msgs)
                    owners.append((len(chunk) - 1, j))

            def on_done(i: int, out) -> None:  # PLUMBING: runs on the event loop, main thread
                c, j = owners[i]
                prob = chunk[c]
                prob["replies"][j] = out
                prob["left"] -= 1
                if prob["left"]:
                    return
                sols = [r.text for r in prob["replies"] if isinstance(r, Reply)]
                errs = [f"{type(r).__name__}: {r}" for r in prob["replies"] if isinstance(r, Exception)]
                meta = {k: prob[k] for k in ("key", "index", "id", "problem", "answer", "images")}
                if not sols:  # every request failed: a re-run retries it
                    data.append_jsonl(fh, error_record(meta, "distil", "; ".join(errs), retryable=True))
                else:
                    data.append_jsonl(fh, {**meta, "status": "ok", "solutions": sols, "failed_requests": errs,
                                           "distil_model": args.distil_model, "distil_at": now()})
                bar.update(chars=sum(len(s) for s in sols), error=not sols)

            client.run_batch(batch, on_done=on_done, **sampling)
    bar.close()
    return {"distil/rows": len(rows), "distil/new": len(todo), **_status_counts(path, "distil"),
            **client_stats("distil", client, bar)}


def client_stats(stage: str, client: ChatClient, bar: StageBar) -> dict:
    """Request counters and latencies (judge.ChatClient), token usage (0 when the server sends
    none) and reply characters of this run, namespaced by stage."""
    out = {**client.stats(), "reply_chars": bar.chars}
    return {f"{stage}/{k}": v for k, v in out.items()}


def _status_counts(path: Path, stage: str) -> dict:
    recs = latest_records(path).values()
    return {f"{stage}/ok": sum(r["status"] == "ok" for r in recs),
            f"{stage}/errors": sum(r["status"] == "error" for r in recs)}


# =============================================================================================
# 3. Filter: keep problems with a correct solution (paper step 2: 2,101 -> 1,442)
# =============================================================================================
def choose_solution(solutions: Sequence[str], answer: str, score: Callable[[str, str], float]) -> tuple[list[float], int | None]:
    """Scores of every solution and the index of the first correct one (None if none is).

    >>> choose_solution(["\\boxed{3}", "\\boxed{4}"], "4", lambda r, a: float(a in r))
    ([0.0, 1.0], 1)
    """
    scores = [float(score(s, answer)) for s in solutions]
    best = next((j for j, s in enumerate(scores) if s >= 1.0), None)
    return scores, best


def run_filter(args: Args) -> dict:
    """Append one record per distilled problem to filter.jsonl with `kept` and the chosen solution."""
    from train_grpo import accuracy_reward, gold_parse_report  # the training scorer (math-verify, main thread)

    path = stage_path(args, "filter")
    distilled = [r for r in latest_records(stage_path(args, "distil")).values() if r["status"] == "ok"]
    done = latest_records(path)
    todo = [r for r in distilled if not is_done(done.get(r["key"]), args.redo_errors)]
    bar = StageBar("filter", len(distilled), len(distilled) - len(todo))
    with data.open_for_append(path) as fh:
        for rec in todo:
            # ALGO: r_acc = math-verify(gold, solution), exactly as train_grpo scores rollouts
            scores, best = choose_solution(
                rec["solutions"], rec["answer"],
                lambda r, a: accuracy_reward(r, a, args.gold_parse, answer_dotall=args.answer_dotall))
            # a gold answer that cannot even match itself means the scorer cannot read it (caveat 6)
            gold_parsable = accuracy_reward(f"\\boxed{{{rec['answer']}}}", rec["answer"], args.gold_parse) == 1.0
            out = {k: rec[k] for k in ("key", "index", "id", "problem", "answer", "images",
                                       "distil_model", "distil_at")}
            data.append_jsonl(fh, {**out, "status": "ok", "kept": best is not None, "scores": scores,
                                   "gold_parsable": gold_parsable,
                                   "solution": None if best is None else rec["solutions"][best],
                                   "filter_at": now()})
            bar.update()
    bar.close()
    recs = [r for r in latest_records(path).values() if r["status"] == "ok"]
    kept = sum(r["kept"] for r in recs)
    unparsable = sum(not r.get("gold_parsable", True) for r in recs)
    differ, policy_note = gold_parse_report([str(r["answer"]) for r in recs], "filter", [f"key {r['key']}" for r in recs])
    print(f"filter: kept {kept} of {len(recs)} problems with a correct solution "
          f"(paper: 1,442 of 2,101); {unparsable} gold answers the scorer cannot parse\n{policy_note}", flush=True)
    return {"filter/total": len(recs), "filter/kept": kept, "filter/gold_unparsable": unparsable,
            "filter/gold_read_differently": differ}


# =============================================================================================
# 4. Extract: the atomic visual facts of the correct solution (paper step 3)
# =============================================================================================
EXTRACT_SYSTEM = """You turn a worked geometry solution into a checklist of visual facts.

A visual fact is one short statement that can be read directly from the diagram or is given in \
the problem text: a length, an angle measure, a point lying on a line or circle, two lines being \
parallel or perpendicular, a shape being a rectangle, and so on. List only the facts that the \
solution actually uses. Each fact must be atomic (one relation), self-contained and written with \
the diagram's own labels.

Do not list reasoning steps, derived values, formulas, or the final answer.

Write one fact per tag, numbered from 1, and nothing else:
<info1>fact</info1>
<info2>fact</info2>

Example
Problem: Find the perimeter of rectangle PQRS.
Solution: The diagram marks PQRS as a rectangle with PQ = 7 and QR = 4. Opposite sides are equal, \
so the perimeter is 2(7 + 4) = 22.
Facts:
<info1>PQRS is a rectangle</info1>
<info2>PQ = 7</info2>
<info3>QR = 4</info3>"""


def extract_messages(problem: str, solution: str) -> list[dict]:
    """Text-only request: the problem (image placeholders removed) and the correct solution."""
    text = problem.replace(data.IMAGE_PLACEHOLDER, "").strip()
    return [{"role": "system", "content": EXTRACT_SYSTEM},
            {"role": "user", "content": f"Problem: {text}\nSolution: {solution}\nFacts:"}]


# Accepts <info3>..</info3>, unnumbered <info>..</info>, and mismatched numbers (<info2>..</info5>).
_ANY_INFO_TAG = re.compile(r"<info\s*(\d*)\s*>(.*?)</info\s*\d*\s*>", re.DOTALL | re.IGNORECASE)


def normalise_facts(reply: str | None) -> list[str]:
    """Facts of an extractor reply, in order of appearance: whitespace collapsed, empty facts and
    duplicates (case/space-insensitive) dropped. No tag at all -> [] (the caller's error).

    >>> normalise_facts("<info2>AB = 5</info2><info>  </info><info7>ab =  5</info7><info>BC = 3</info>")
    ['AB = 5', 'BC = 3']
    """
    facts, seen = [], set()
    for _, raw in _ANY_INFO_TAG.findall(reply or ""):
        fact = " ".join(raw.split())
        norm = fact.lower().replace(" ", "")
        if fact and norm not in seen:
            seen.add(norm)
            facts.append(fact)
    return facts


def run_extract(args: Args) -> dict:
    """Append one record per kept problem to extract.jsonl: the facts, or an error."""
    path = stage_path(args, "extract")
    kept = [r for r in latest_records(stage_path(args, "filter")).values() if r["status"] == "ok" and r["kept"]]
    done = latest_records(path)
    todo = [r for r in kept if not is_done(done.get(r["key"]), args.redo_errors)]
    client = make_client(args.extract_base_urls, args.extract_model, args.extract_api_key_env, args)
    bar = StageBar("extract", len(kept), len(kept) - len(todo), client)
    sampling = {"temperature": args.extract_temperature, "max_tokens": args.extract_max_tokens}
    with data.open_for_append(path) as fh:
        for start in range(0, len(todo), args.chunk_rows):
            chunk = todo[start:start + args.chunk_rows]

            def on_done(i: int, out) -> None:  # PLUMBING: runs on the event loop, main thread
                rec = {k: v for k, v in chunk[i].items() if k not in ("status", "kept", "scores")}
                name = data.row_name({"_index": rec["index"], "id": rec["id"]})
                if isinstance(out, Exception):
                    data.append_jsonl(fh, error_record(rec, "extract", f"{name}: request failed "
                                                       f"({type(out).__name__}: {out})", retryable=True))
                    bar.update(error=True)
                    return
                out = out.text
                facts = normalise_facts(out)  # ALGO: v1..vm, renumbered, deduplicated
                if not facts:
                    data.append_jsonl(fh, {**error_record(rec, "extract", f"{name}: no <infoK> fact "
                                                          f"in the extractor reply"), "extract_raw": out})
                    bar.update(chars=len(out), error=True)
                    return
                assert split_annotations(format_facts(facts)) == facts  # what the judge will read
                data.append_jsonl(fh, {**rec, "status": "ok", "visual_key_info": format_facts(facts),
                                       "extract_raw": out, "extract_model": args.extract_model,
                                       "extract_at": now()})
                bar.update(chars=len(out))

            client.run_batch([extract_messages(r["problem"], r["solution"]) for r in chunk],
                             on_done=on_done, **sampling)
    bar.close()
    return {"extract/kept_rows": len(kept), "extract/new": len(todo), **_status_counts(path, "extract"),
            **client_stats("extract", client, bar)}


# =============================================================================================
# 5. Export: the training schema, as JSONL and parquet
# =============================================================================================
EXPORT_FIELDS = ("id", "problem", "answer", "images", "visual_key_info", "solution", "distil_model",
                 "extract_model", "distil_at", "filter_at", "extract_at", "key", "index")


def export(args: Args) -> dict:
    """Write train.jsonl and train.parquet (rows ordered by input position) from the ok records of
    extract.jsonl; relative image paths resolve against output_dir, so data.load_rows reads both."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(args.output_dir)
    recs = sorted((r for r in latest_records(stage_path(args, "extract")).values() if r["status"] == "ok"),
                  key=lambda r: r["index"])
    rows = []
    for r in recs:
        row = {k: r.get(k) for k in EXPORT_FIELDS}
        row["id"] = None if row["id"] is None else str(row["id"])  # one parquet type for ids
        data.check_row({**row, "_index": r["index"]}, require_facts=True)
        rows.append(row)
    data.write_jsonl(out_dir / "train.jsonl", rows)
    schema = pa.schema([(k, pa.list_(pa.string()) if k == "images" else
                         pa.int64() if k == "index" else pa.string()) for k in EXPORT_FIELDS])
    tmp = out_dir / "train.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    tmp.replace(out_dir / "train.parquet")
    return {"export/rows": len(rows)}


def error_summary(args: Args) -> list[dict]:
    """Every problem whose latest record in some stage is an error: stage, key and reason."""
    errs = []
    for stage in ("distil", "filter", "extract"):
        for r in latest_records(stage_path(args, stage)).values():
            if r["status"] == "error":
                errs.append({"stage": stage, "key": r["key"], "error": r["error"]})
    return errs


# =============================================================================================
# 7. CLI
# =============================================================================================
def run(stage: str, args: Args) -> dict:
    """Run one stage (or all three, then export); write and return summary.json's content."""
    summary: dict[str, Any] = {"stage": stage}
    if stage in ("distil", "all"):
        summary.update(run_distil(args))
    if stage in ("filter", "all"):
        summary.update(run_filter(args))
    if stage in ("extract", "all"):
        summary.update(run_extract(args))
        summary.update(export(args))
    errs = error_summary(args)
    summary["errors"] = len(errs)
    summary["error_examples"] = errs[:20]
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "error_examples"}, indent=1, default=str))
    for e in errs[:5]:
        print(f"error [{e['stage']}] {e['error']}", file=sys.stderr)
    return summary


@dataclasses.dataclass
class DistilArgs(Args):
    """Stage 1: a strong multimodal model solves each problem step by step -> distil.jsonl."""


@dataclasses.dataclass
class FilterArgs(Args):
    """Stage 2: keep the problems with a correct solution (the training scorer) -> filter.jsonl."""


@dataclasses.dataclass
class ExtractArgs(Args):
    """Stage 3: a text-only LLM lists the visual facts of each kept solution -> extract.jsonl,
    then train.jsonl and train.parquet."""


@dataclasses.dataclass
class AllArgs(Args):
    """The three stages in order, then the export (train.jsonl, train.parquet)."""


STAGES = {"distil": DistilArgs, "filter": FilterArgs, "extract": ExtractArgs, "all": AllArgs}


def main(argv: list[str] | None = None) -> dict:
    args = tyro.extras.subcommand_cli_from_dict(STAGES, args=argv, prog="annotate.py", description=__doc__)
    return run(next(name for name, cls in STAGES.items() if type(args) is cls), args)


if __name__ == "__main__":
    main()
