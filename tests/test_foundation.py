"""Foundation: the tiny model loads and generates with an image in transformers and in vLLM,
the demo data fits the training schema with true and sufficient facts, and bad rows fail loudly."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
import torch
from PIL import Image

import data
from demo import demo_data
from demo.tiny_model import build_tiny_model


# ---------------------------------------------------------------------------------------------
# The test harness itself (tests/conftest.py): what keeps `make test` within its time
# ---------------------------------------------------------------------------------------------
@pytest.mark.xdist_group("engine")
def test_tests_sharing_an_expensive_fixture_run_on_one_worker(request):
    """Under `make test` (pytest-xdist, --dist loadgroup) a grouped test carries its group in its
    node id, which is how xdist sends the group to one worker; where it does not (pytest 9.2 with
    xdist 3.8) every worker builds its own engine and served model."""
    if not request.config.getoption("loadgroup", False):
        pytest.skip("not run under pytest-xdist --dist loadgroup")
    assert request.node.nodeid.endswith("@engine"), request.node.nodeid


def test_each_xdist_worker_uses_its_share_of_the_cores():
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        pytest.skip("not run under several pytest-xdist workers")
    share = max(1, (os.cpu_count() or 1) // workers)
    assert int(os.environ["OMP_NUM_THREADS"]) <= share
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])  # set before torch was imported


# ---------------------------------------------------------------------------------------------
# Tiny model
# ---------------------------------------------------------------------------------------------
def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_is_deterministic_for_a_seed(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(again / name) == _sha(tiny_model_dir / name), name
    assert _sha(other / "model.safetensors") != _sha(tiny_model_dir / "model.safetensors")


def test_readme_states_the_tiny_models_true_parameter_count(tiny_model_dir):
    """README states the tiny model's size once; it must be the count of the model actually built."""
    import json
    import re
    from pathlib import Path

    built = json.loads((tiny_model_dir / "tiny_model.json").read_text())["parameters"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    stated = re.findall(r"([\d,]+)-parameter Qwen2\.5-VL", readme)
    assert stated == [f"{built:,}"], (stated, built)


def _prompt_and_image(model_dir, demo_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    row = data.load_rows(str(demo_dir / "test.jsonl"))[0]
    images = data.row_images(row, 3136, 200_704)
    prompt = data.build_prompt(processor, row["problem"], len(images))
    return processor, prompt, images


def test_chat_template_places_image_and_instruction(tiny_model_dir, demo_dir):
    _, prompt, _ = _prompt_and_image(tiny_model_dir, demo_dir)
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find" in prompt
    assert data.INSTRUCTION in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def _hf_greedy(model_dir, processor, prompt, images, n=16):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    # one image token per 28x28 pixels of the resized image
    h, w = images[0].height, images[0].width
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == (h // 28) * (w // 28)
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs["input_ids"][0].tolist()


def test_transformers_generates_with_an_image(tiny_model_dir, demo_dir):
    """Greedy generation from an image prompt is deterministic and in the vocabulary, and the
    next-token distribution depends on the image (a blank picture changes it)."""
    from PIL import Image

    processor, prompt, images = _prompt_and_image(tiny_model_dir, demo_dir)
    tokens, _ = _hf_greedy(tiny_model_dir, processor, prompt, images)
    assert tokens == _hf_greedy(tiny_model_dir, processor, prompt, images)[0]
    eos = processor.tokenizer.eos_token_id
    assert (len(tokens) == 16 or tokens[-1] == eos) and max(tokens) < len(processor.tokenizer)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def next_logits(imgs):
        enc = processor(text=[prompt], images=imgs, return_tensors="pt")
        with torch.no_grad():
            return model(**enc).logits[0, -1]

    blank = [Image.new("RGB", images[0].size, "white")]
    assert not torch.allclose(next_logits(images), next_logits(blank), atol=1e-4)


def test_vllm_cpu_settings_size_the_kv_cache_to_the_batch_and_turn_compile_off(tiny_model_dir, monkeypatch):
    """K and V of every layer in float32, for max_seqs sequences of max_model_len tokens plus one
    block's rounding, capped at 1 GiB; VLLM_CPU_KVCACHE_SPACE decides where it is set. (vLLM
    accepts the one-sequence size: the test below starts its engine with it.) torch.compile is off
    afterwards either way."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(torch._dynamo.config, "disable", False)  # restored after the test
    text = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    per_token = 0
    for _layer in range(text["num_hidden_layers"]):
        per_token += 2 * text["num_key_value_heads"] * head_dim * 4
    assert data.vllm_cpu_settings(str(tiny_model_dir), 1000, 16) == {"kv_cache_memory_bytes": per_token * 16 * 1256}
    assert torch._dynamo.config.disable
    assert data.vllm_cpu_settings(str(tiny_model_dir), 100_000, 10_000) == {"kv_cache_memory_bytes": 2**30}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert data.vllm_cpu_settings(str(tiny_model_dir), 1000, 16) == {}


@pytest.mark.slow
def test_vllm_generates_with_an_image_and_agrees_with_transformers(tiny_model_dir, demo_dir):
    from vllm import LLM, SamplingParams

    processor, prompt, images = _prompt_and_image(tiny_model_dir, demo_dir)
    hf_tokens, hf_prompt_ids = _hf_greedy(tiny_model_dir, processor, prompt, images)
    settings = data.vllm_cpu_settings(str(tiny_model_dir), 2048, max_seqs=1)  # the smallest KV cache we ask for
    llm = LLM(model=str(tiny_model_dir), dtype="float32", enforce_eager=True, max_model_len=2048,
              seed=0, limit_mm_per_prompt={"image": 1}, **settings)
    try:
        out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": images}}],
                           SamplingParams(max_tokens=len(hf_tokens), temperature=0.0, ignore_eos=True))
    finally:
        del llm
    assert list(out[0].prompt_token_ids) == hf_prompt_ids  # same image-token expansion
    assert list(out[0].outputs[0].token_ids) == hf_tokens  # same greedy continuation


# ---------------------------------------------------------------------------------------------
# Image preprocessing: our smart_resize agrees with the Hugging Face processor's
# ---------------------------------------------------------------------------------------------
def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    rng = random.Random(0)
    for _ in range(500):
        h, w = rng.randint(10, 3000), rng.randint(10, 3000)
        if max(h, w) / min(h, w) > 150:
            continue
        for lo, hi in ((3136, 1_806_336), (3136, 200_704), (50_000, 60_000)):
            assert data.smart_resize(h, w, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_resized_image_is_not_resized_again_by_the_processor(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    img = data.resize_image(Image.new("RGB", (333, 517), "white"), 3136, 200_704)
    grid = processor.image_processor(images=[img], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert grid == [1, img.height // 14, img.width // 14]


# ---------------------------------------------------------------------------------------------
# Demo data
# ---------------------------------------------------------------------------------------------
def test_demo_rows_fit_the_training_schema(demo_dir):
    for split, n in (("train", 64), ("test", 16)):
        rows = data.load_rows(str(demo_dir / f"{split}.jsonl"))
        assert len(rows) == n
        for row in rows:
            data.check_row(row, require_facts=True)
            assert row["problem"].startswith("<image>")
            assert not any(ch.isdigit() for ch in row["problem"]), "numbers must come from the diagram"
            images = data.row_images(row, 3136, 200_704)
            assert len(images) == 1 and images[0].size[0] > 0
            assert row["answer"] in row["choices"] and row["choices"][" ABCD".index(row["answer_letter"]) - 1] == row["answer"]


def test_every_answer_follows_from_the_stated_facts(demo_dir):
    import re

    def split_facts(text):  # independent of judge.split_annotations on purpose
        return [f.strip() for _, f in re.findall(r"<info(\d+)>(.*?)</info\1>", text, re.S)]

    for split in ("train", "test"):
        for row in data.read_jsonl(demo_dir / f"{split}.jsonl"):
            facts = split_facts(row["visual_key_info"])
            assert demo_data.solve_from_facts(row["kind"], facts) == int(row["answer"]), row["id"]
            assert f"\\boxed{{{row['answer']}}}" in row["solution"]
            for fact in facts:  # the reference solution states every fact
                assert fact in row["solution"], (row["id"], fact)


def test_test_split_covers_every_family_and_differs_from_train(demo_dir):
    train = data.read_jsonl(demo_dir / "train.jsonl")
    test = data.read_jsonl(demo_dir / "test.jsonl")
    assert {r["kind"] for r in test} == set(demo_data.FAMILIES)
    train_keys = {(r["kind"], r["visual_key_info"]) for r in train}
    overlap = sum((r["kind"], r["visual_key_info"]) in train_keys for r in test)
    assert overlap <= 2


def test_demo_generation_is_deterministic(demo_dir, tmp_path):
    again = demo_data.generate(tmp_path, num_train=64, num_test=16, seed=0, parquet=False)
    assert (again / "train.jsonl").read_text() == (demo_dir / "train.jsonl").read_text()
    assert _sha(again / "images" / "test_00003.png") == _sha(demo_dir / "images" / "test_00003.png")


def test_parquet_matches_jsonl_and_loads_with_datasets(demo_dir):
    import datasets

    from_jsonl = data.load_rows(str(demo_dir / "test.jsonl"))
    from_parquet = data.load_rows(str(demo_dir / "test.parquet"))
    hub_style = datasets.load_dataset("parquet", data_files=str(demo_dir / "test.parquet"), split="train")
    assert len(from_jsonl) == len(from_parquet) == len(hub_style)
    for a, b, c in zip(from_jsonl, from_parquet, hub_style):
        for key in ("id", "problem", "answer", "visual_key_info", "choices"):
            assert a[key] == b[key] == c[key]
        img_a = data.open_image(a["images"][0])
        img_b = data.open_image(b["images"][0])
        assert img_a.tobytes() == img_b.tobytes() == c["images"][0].convert("RGB").tobytes()


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the row and field
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def bad_file(demo_dir, tmp_path):
    rows = data.read_jsonl(demo_dir / "test.jsonl")[:6]
    rows = [{**r, "images": [str(demo_dir / r["images"][0])]} for r in rows]
    del rows[1]["answer"]
    rows[2]["images"] = [str(tmp_path / "missing.png")]
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    rows[3]["images"] = [str(tmp_path / "corrupt.png")]
    rows[4]["problem"] = "<image><image>Find x."
    rows[5]["visual_key_info"] = "  "
    path = tmp_path / "bad.jsonl"
    data.write_jsonl(path, rows)
    return path


@pytest.mark.parametrize("index, field, words", [
    (1, "answer", "missing field 'answer'"),
    (2, "images", "image file not found"),
    (3, "images", "cannot be opened"),
    (4, "problem", "2 '<image>' placeholders"),
    (5, "visual_key_info", "'visual_key_info' is empty"),
])
def test_malformed_row_gives_clear_error(bad_file, index, field, words):
    row = data.load_rows(str(bad_file))[index]
    with pytest.raises(data.RowError) as err:
        data.check_row(row, require_facts=True)
        data.row_images(row, 3136, 200_704)
    msg = str(err.value)
    assert f"row {index} (id=demo-test-0000{index})" in msg and field in msg and words in msg


def test_good_row_in_the_bad_file_passes(bad_file):
    row = data.load_rows(str(bad_file))[0]
    data.check_row(row, require_facts=True)
    assert data.row_images(row, 3136, 200_704)


def test_jsonl_survives_a_kill_mid_write(tmp_path):
    path = tmp_path / "out.jsonl"
    with data.open_for_append(path) as fh:
        data.append_jsonl(fh, {"i": 0})
        data.append_jsonl(fh, {"i": 1})
    with open(path, "a") as fh:
        fh.write('{"i": 2, "trunc')  # a kill during the third write
    assert [r["i"] for r in data.read_jsonl(path)] == [0, 1]
    with data.open_for_append(path) as fh:  # resume: the partial line is cut, not glued onto
        data.append_jsonl(fh, {"i": 2})
    assert [r["i"] for r in data.read_jsonl(path)] == [0, 1, 2]
    path.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        data.read_jsonl(path)


def test_demo_scripts_run_as_modules_from_the_repository_root():
    """The Makefile runs them as `python -m demo.<script>` (the package imports data.py from the root)."""
    import subprocess
    import sys

    for module in ("demo.tiny_model", "demo.demo_data"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                             cwd=data.Path(data.__file__).parent)
        assert out.returncode == 0 and "--output-dir" in out.stdout.replace("_", "-"), out.stderr


def test_quiet_libraries_hides_library_warnings_but_not_errors():
    """Our scripts call data.quiet_libraries() first: transformers' warnings and loading bars and
    vLLM's info/warning log are hidden, their errors still show."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import data; data.quiet_libraries()\n"
            "import os, transformers\n"
            "log = transformers.utils.logging.get_logger('transformers.demo')\n"
            "log.warning('library-warning'); log.error('library-error')\n"
            "print('vllm level', os.environ['VLLM_LOGGING_LEVEL'])\n"
            "print('bars', transformers.utils.logging.is_progress_bar_enabled())\n")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], env=env)
    assert out.returncode == 0, out.stderr
    assert "library-error" in out.stderr and "library-warning" not in out.stderr
    assert "vllm level ERROR" in out.stdout and "bars False" in out.stdout
