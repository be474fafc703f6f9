"""Shared plumbing, no algorithm: dataset rows, images, the prompt, JSONL files, output folders,
vLLM CPU settings.

Every script that touches problems imports these helpers, so training, evaluation and
annotation agree on three things that must never drift apart:

1. the *row schema* of the training data (the authors' released Geometry3K annotations):
       problem          str, the question; contains one `<image>` placeholder per image
       answer           str, the gold answer (a number, expression or option text)
       images           list of images: file paths, {"bytes", "path"} dicts (Hugging Face
                        `Image` feature, how parquet stores them) or PIL images
       visual_key_info  str, the visual facts as "<info1>fact</info1>\n<info2>fact</info2>..."
                        (training only; optional elsewhere)
2. the *prompt*: problem text + " " + INSTRUCTION, one user turn, images where `<image>` stood;
3. the *image preprocessing*: resize to Qwen2.5-VL's grid (multiples of 28 px, pixel count in
   [min_pixels, max_pixels]) once, here, so the Hugging Face processor and vLLM see identical
   pixels and produce identical image tokens.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"

# The instruction appended to every problem: our paraphrase of the official prompt, with exactly its
# requirements (reason first as an internal monologue; reasoning in <think> </think>; answer in
# <answer> </answer>; final answer in \boxed{} inside the answer tags) and nothing more. In particular
# it neither asks to describe the diagram (what r_v pays for) nor spells out the newlines that r_fmt
# checks: the official run lets the model discover both through the rewards. The authors' exact text
# is the SYSTEM_PROMPT of their training script and evaluation scripts (README, "Prompt"); pass it
# with --instruction @FILE.
INSTRUCTION = (
    "Reason through the problem privately, as an inner monologue, before you give the final answer. "
    "Enclose that reasoning in <think> </think> tags and the answer in <answer> </answer> tags, and put "
    "the final answer in \\boxed{} within the <answer> </answer> tags."
)


def resolve_instruction(value: str) -> str:
    """An --instruction value: the text itself, or "@PATH" for the text of a file (one trailing
    newline dropped), so a user can run the authors' exact instruction."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    if not path.is_file():
        raise FileNotFoundError(f"--instruction {value}: no such file {path}")
    text = path.read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


# Qwen2.5-VL: 14 px patches merged 2x2 -> one image token per 28x28 pixels.
IMAGE_FACTOR = 28
PAPER_MIN_PIXELS = 3_136  # official training script
PAPER_MAX_PIXELS = 1_806_336  # official training script

REQUIRED_FIELDS = ("problem", "answer", "images")


class RowError(ValueError):
    """A dataset row that cannot be used; the message names the row and the field."""


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int,
                 factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, pixel count within [min_pixels, max_pixels],
    aspect ratio kept as closely as the grid allows (Qwen2-VL's rule, re-derived).

    >>> smart_resize(100, 200, 3136, 1_806_336)
    (112, 196)
    """
    if min(height, width) <= 0:
        raise ValueError(f"image has a zero side: {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200 is not supported by Qwen2.5-VL: {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def open_image(value: Any, where: str = "image", base_dir: str | os.PathLike | None = None,
               verify: bool = False) -> Image.Image:
    """Open one image given as a PIL image, a path (relative to `base_dir`), or a
    {"bytes": ..., "path": ...} dict; return it in RGB. Raises RowError naming `where`.
    `verify`: also run PIL's integrity check (checksums) on the encoded file first."""
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict) and value.get("bytes"):
            if verify:
                Image.open(io.BytesIO(value["bytes"])).verify()
            img = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            return open_image(value["path"], where, base_dir, verify)
        elif isinstance(value, (str, os.PathLike)) and str(value):
            path = Path(value)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not path.exists():
                raise RowError(f"{where}: image file not found: {path}")
            if verify:
                with Image.open(path) as probe:
                    probe.verify()
            img = Image.open(path)
        else:
            raise RowError(f"{where}: no usable image (got {type(value).__name__}: {str(value)[:80]!r})")
        img.load()
        return img.convert("RGB")
    except RowError:
        raise
    except Exception as e:  # PIL raises several types for corrupt files
        raise RowError(f"{where}: image cannot be opened ({type(e).__name__}: {e})") from e


def resize_image(img: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Resize to the Qwen2.5-VL grid (see `smart_resize`). Idempotent. The result's
    info["original_size"] keeps the (width, height) before resizing: Qwen2.5-VL answers boxes in
    pixels of the image it sees, and gold boxes given for the original must be scaled to it."""
    size = img.info.get("original_size", img.size)
    h, w = smart_resize(img.height, img.width, min_pixels, max_pixels)
    out = img if (h, w) == (img.height, img.width) else img.resize((w, h), Image.Resampling.BICUBIC)
    out.info["original_size"] = size
    return out


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def load_rows(source: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """Rows from a local .jsonl/.json/.parquet file or a Hugging Face dataset id (+ split).

    Relative image paths in local files are resolved against the file's folder, so a dataset
    folder can be moved as a whole. Each row gets `_index` (its position) for error messages.
    """
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"dataset file not found: {path}")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif path.suffix == ".json" and path.read_text()[:1].strip() == "[":
            rows = json.loads(path.read_text())
        else:
            rows = read_jsonl(path)
        base = path.parent.resolve()
        for row in rows:
            if isinstance(row.get("images"), list):
                row["images"] = [_resolve(img, base) for img in row["images"]]
    else:  # a Hugging Face dataset id, e.g. hiyouga/geometry3k
        import datasets

        check_source(source, "dataset", "dataset")  # a mistyped path fails here, in seconds

        rows = list(datasets.load_dataset(source, split=split))
    if limit is not None:
        rows = rows[:limit]
    for i, row in enumerate(rows):
        row["_index"] = i
    return rows


def _resolve(img: Any, base: Path) -> Any:
    if isinstance(img, str) and img and not os.path.isabs(img):
        return str(base / img)
    if isinstance(img, dict) and not img.get("bytes") and img.get("path") and not os.path.isabs(img["path"]):
        return {**img, "path": str(base / img["path"])}
    return img


def row_name(row: dict, index: int | None = None) -> str:
    """'row 12 (id=2445)' - how error messages refer to a row."""
    index = row.get("_index", index)
    rid = row.get("id", row.get("pid"))
    return f"row {index}" + (f" (id={rid})" if rid is not None else "")


def check_row(row: dict, index: int | None = None, require_facts: bool = False) -> None:
    """Raise RowError (naming the row and field) unless `row` fits the training schema
    (images are not opened here; `row_errors` does that)."""
    errors = schema_errors(row, row_name(row, index), require_facts)
    if errors:
        raise RowError(errors[0])


def schema_errors(row: dict, name: str, require_facts: bool = False) -> list[str]:
    """What keeps `row` from fitting the training schema, one message per problem."""
    missing = [f for f in REQUIRED_FIELDS + (("visual_key_info",) if require_facts else ())
               if f not in row or row[f] is None]
    if missing:
        return [f"{name}: missing field '{f}'" for f in missing]
    errors = []
    if not isinstance(row["problem"], str) or not row["problem"].strip():
        errors.append(f"{name}: field 'problem' is empty or not a string")
    if not str(row["answer"]).strip():
        errors.append(f"{name}: field 'answer' is empty")
    images = row["images"]
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        errors.append(f"{name}: field 'images' must be a non-empty list")
    elif isinstance(row["problem"], str) and row["problem"].count(IMAGE_PLACEHOLDER) not in (0, len(images)):
        errors.append(f"{name}: field 'problem' has {row['problem'].count(IMAGE_PLACEHOLDER)} "
                      f"'{IMAGE_PLACEHOLDER}' placeholders but 'images' has {len(images)} images")
    if require_facts and not str(row["visual_key_info"]).strip():
        errors.append(f"{name}: field 'visual_key_info' is empty")
    return errors


def row_errors(row: dict, require_facts: bool = False) -> list[str]:
    """Everything wrong with a row, each message naming the row and the field ([] = usable):
    the schema, then every image opened, verified and checked against Qwen2.5-VL's limits."""
    name = row_name(row)
    errors = schema_errors(row, name, require_facts)
    if errors:
        return errors
    for k, value in enumerate(row["images"]):
        try:
            img = open_image(value, f"{name}: field 'images'[{k}]", verify=True)
            smart_resize(img.height, img.width, 1, 1 << 62)  # zero side / aspect ratio limits only
        except RowError as e:
            errors.append(str(e))
        except ValueError as e:
            errors.append(f"{name}: field 'images'[{k}]: {e}")
    return errors


def find_bad_rows(rows: list[dict], require_facts: bool = False, workers: int = 8,
                  desc: str = "checking rows", progress: bool = True) -> dict[int, list[str]]:
    """`row_errors` of every row, in parallel threads (image decoding releases the GIL), with a
    progress bar. Returns {row["_index"]: [reasons]} for the unusable rows only."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(rows)))) as pool:
        results = list(tqdm(pool.map(lambda r: row_errors(r, require_facts), rows), total=len(rows),
                            desc=desc, unit="row", disable=not progress))
    return {row.get("_index", i): errs for i, (row, errs) in enumerate(zip(rows, results)) if errs}


def row_images(row: dict, min_pixels: int, max_pixels: int) -> list[Image.Image]:
    """Open and resize every image of a row (RowError names the row and image index)."""
    name = row_name(row)
    return [resize_image(open_image(img, f"{name}: field 'images'[{k}]"), min_pixels, max_pixels)
            for k, img in enumerate(row["images"])]


# ---------------------------------------------------------------------------------------------
# Prompt (one builder for training, evaluation and annotation)
# ---------------------------------------------------------------------------------------------
def build_messages(problem: str, num_images: int = 1, instruction: str | None = INSTRUCTION) -> list[dict]:
    """One user turn: the problem text with images where `<image>` stood, then the instruction.

    Official recipe: text = problem + " " + instruction, split on `<image>`; a problem without a
    placeholder gets its images in front (as Geometry3K's "<image>Find x." does).
    """
    text = problem if instruction is None else f"{problem} {instruction}"
    if IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER * num_images + text
    content: list[dict] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip() if k == 0 else piece})
    return [{"role": "user", "content": content}]


def build_prompt(processor_or_tokenizer, problem: str, num_images: int = 1,
                 instruction: str | None = INSTRUCTION) -> str:
    """The chat-formatted prompt string (with the generation prefix) for one problem."""
    return processor_or_tokenizer.apply_chat_template(
        build_messages(problem, num_images, instruction), tokenize=False, add_generation_prompt=True)


def row_prompt(processor_or_tokenizer, row: dict, num_images: int = 1, instruction: str | None = INSTRUCTION) -> str:
    """The prompt of a dataset row. Geometry (no `task` column, or task "geometry"): the problem +
    " " + instruction. A perception task of the sister paper (task grounding / counting / ocr /
    detection): its prompt template (perception_rewards.TASK_PROMPTS) filled with the row's
    `problem` and `classes`, images first, no instruction (those runs use no thinking)."""
    task = row.get("task") or "geometry"
    if task == "geometry":
        return build_prompt(processor_or_tokenizer, row["problem"], num_images, instruction)
    from perception_rewards import TASK_PROMPTS

    text = TASK_PROMPTS[task].format(question=row["problem"], categories=", ".join(row.get("classes") or []))
    return build_prompt(processor_or_tokenizer, text, num_images, None)


# What a checkpoint was trained with: train_grpo.py writes it into checkpoint-N/policy/, and
# `evaluate.py eval --protocol training` asks the same prompt at the same pixel bounds by default.
TRAIN_SETTINGS = "train_settings.json"


def train_settings(args) -> dict:
    """The prompt-side settings of a training run (train_grpo.Args): task, instruction, pixel
    bounds, prompt and response lengths."""
    keys = ("task", "instruction", "min_pixels", "max_pixels", "max_prompt_length", "max_response_length")
    return {k: getattr(args, k) for k in keys}


def read_train_settings(model_dir: str | os.PathLike) -> dict | None:
    """A model folder's TRAIN_SETTINGS, or None (a base model, or a hub id)."""
    path = Path(model_dir) / TRAIN_SETTINGS
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Quiet third-party libraries (their errors still show)
# ---------------------------------------------------------------------------------------------
def quiet_libraries() -> None:
    """Keep our scripts' output readable: vLLM logs only errors (on CPU it otherwise warns about
    thread settings at every step), transformers logs errors and shows no loading bars, and its
    deprecation warnings are hidden. Set VLLM_LOGGING_LEVEL=INFO to see vLLM's log again."""
    import warnings

    import transformers  # a lazy module: cheap to import here

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # read when vLLM is first imported
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def vllm_cpu_settings(model: str, max_model_len: int, max_seqs: int) -> dict:
    """Settings for vLLM's CPU backend ({} on a GPU), returned as engine kwargs:

    1. a KV cache (float32) that holds `max_seqs` sequences of `max_model_len` tokens, at most
       1 GiB, unless VLLM_CPU_KVCACHE_SPACE (GiB) is set, which then decides. vLLM's CPU default
       reserves a share of RAM and zero-fills it at start (~2 s per GiB on 2 cores); a tiny model
       needs a few MB.
    2. torch.compile off in this process (none of our code compiles): vLLM's sampler compiles a
       small counting helper with inductor at its first batch, 2-3 s per engine start here (more
       with a cold cache) for a kernel that runs as fast eagerly.
    """
    import torch
    from transformers import AutoConfig

    if torch.cuda.is_available():
        return {}
    torch._dynamo.config.disable = True
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return {}
    text = AutoConfig.from_pretrained(model).get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    bytes_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4  # K and V
    tokens = max(1, max_seqs) * (max_model_len + 256)  # + room for rounding to whole blocks
    return {"kv_cache_memory_bytes": min(2**30, bytes_per_token * tokens)}


# ---------------------------------------------------------------------------------------------
# JSONL files that survive a kill
# ---------------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file. A truncated *last* line (the process was killed mid-write) is dropped;
    a corrupt line anywhere else is an error naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # partial final write: the row will be redone on resume
                break
            raise ValueError(f"{path}: line {n} is not valid JSON ({e})") from e
    return rows


def open_for_append(path: str | os.PathLike):
    """Open a JSONL file for appending after cutting off a partial last line left by a kill
    (so the next row does not get glued onto it). Creates the file and its folder if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def append_jsonl(fh, row: dict) -> None:
    """Append one row to an open text file and flush it to the OS, so a kill loses nothing."""
    fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    fh.flush()


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Output folders (one run at a time) and names that must be local paths or reachable hub ids
# ---------------------------------------------------------------------------------------------
class FolderInUse(RuntimeError):
    """Another live process holds the output folder's lock."""


def lock_folder(folder: str | os.PathLike):
    """Take an exclusive OS lock (flock) on <folder>/.lock, held while the returned file stays
    open, i.e. until this process ends. The OS drops the lock of a killed process, so no stale
    lock is ever left behind. A second process asking for the same folder gets FolderInUse at
    once, naming the folder and the holder's pid and command line."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / ".lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "a process that has not written its pid yet"
        fh.close()
        raise FolderInUse(f"{folder} is in use by another run ({holder}): wait for it to end, stop "
                          f"it, or choose another output folder") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
    fh.flush()
    return fh


def check_source(name: str, kind: str = "model", flag: str = "--model") -> str:
    """`name` as a local path or a hub id that can be reached, checked in seconds: a mistyped
    path must not turn into minutes of hub retries. kind: "model" or "dataset".

    - an existing local folder or file is returned as is; a training checkpoint folder
      (checkpoint-N/, whose model lives in policy/) is returned as its policy/ folder;
    - otherwise `name` must be a hub id already in the local cache, or, with the hub allowed
      (HF_HUB_OFFLINE unset), one the hub confirms within 10 s. Anything else is a
      FileNotFoundError that names the flag and says what was tried.
    """
    path = Path(name).expanduser()
    if path.exists():
        if kind == "model" and path.is_dir() and not (path / "config.json").exists():
            if (path / "policy" / "config.json").exists():
                print(f"{flag} {name}: a training checkpoint; using its model {path / 'policy'}",
                      flush=True)
                return str(path / "policy")
            raise FileNotFoundError(f"{flag} {name}: a folder without config.json, so not a model "
                                    f"(a checkpoint's model is in checkpoint-N/policy)")
        return name
    import huggingface_hub

    where = f"{flag} {name!r} is not found locally"
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{where} (and it is not a hub id of the form owner/name)")
    repo_type = "model" if kind == "model" else "dataset"
    try:  # in the local hub cache: fine offline
        huggingface_hub.snapshot_download(name, repo_type=repo_type, local_files_only=True)
        return name
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        pass
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{where} nor in the hub cache, and HF_HUB_OFFLINE=1 forbids the "
                                f"hub: check the path, or download {name} first")
    api = huggingface_hub.HfApi()
    try:
        (api.model_info if kind == "model" else api.dataset_info)(name, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{where}, and the hub has no {kind} of that name") from None
    except huggingface_hub.errors.HfHubHTTPError:
        return name  # exists but gated or private: the loader reports its own error
    except Exception as e:  # connection refused, DNS, timeout
        raise FileNotFoundError(f"{where}, and the hub is unreachable ({type(e).__name__}): check "
                                f"the path; set HF_HUB_OFFLINE=1 to skip the hub for cached ids") from None
    return name
