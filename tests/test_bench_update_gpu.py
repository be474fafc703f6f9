"""benchmarks/bench_update_gpu.py: its toy-size run on CPU goes through train_grpo.train_on_batch and
trains; its synthetic samples have the layout train_grpo.collate expects; its 3B preset has the
published size."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_update_gpu as B  # noqa: E402
import train_grpo as T  # noqa: E402


@pytest.fixture
def one_thread():
    """Toy-sized ops are far too small to share out: on a busy 2-core machine two intra-op threads
    made one toy update ~15x slower (2.8 s vs 0.17 s) than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_toy_run_measures_and_trains(one_thread):
    args = B.Args(preset="toy", seq_len=128, completion_len=32, num_samples=4, micro_batch_size=2, steps=1,
                  cpu=True, seed=3)
    result = B.run(args)
    fresh = B.build_model("toy", seed=3)  # the same random init as run() starts from
    assert result["num_params"] == sum(p.numel() for p in fresh.parameters())
    assert result["tokens_per_update"] == 4 * 128 and result["image_tokens_per_seq"] == 16
    assert result["tokens_per_s"] > 0 and result["seconds_per_update"] > 0
    assert result["mfu"] is None and result["peak_memory_gib"] > 0  # CPU: no MFU, peak RSS
    assert math.isfinite(result["loss"]) and math.isfinite(result["grad_norm"]) and result["grad_norm"] > 0
    # 2 AdamW updates moved the language model *and* the vision tower: the loss reached the image path
    trained = dict(result["model"].named_parameters())
    moved = {name for name, p in fresh.named_parameters() if not torch.equal(p, trained[name].detach())}
    assert any(".visual.blocks." in name for name in moved), sorted(moved)[:5]
    assert any(".language_model.layers." in name for name in moved), sorted(moved)[:5]
    last = B.report(result, args).splitlines()[-1]
    assert re.fullmatch(r"tokens/s [\d,]+, MFU n/a, peak memory \d+\.\d\d GiB", last), last


def test_synthetic_samples_have_the_collate_layout():
    """Defaults: 2,048 tokens = 1,024 prompt tokens holding one 448x448 image (32x32 patches ->
    256 image tokens between the vision markers) + 1,024 completion tokens."""
    preset = B.PRESETS["3b"]
    ids = preset["ids"]
    samples = B.synthetic_samples("3b", 2, 2048, 1024, 448, seed=0)
    for s in samples:
        prompt = s["prompt_ids"]
        assert len(prompt) + len(s["completion_ids"]) == 2048 and len(s["completion_ids"]) == 1024
        first = prompt.index(ids["image_token_id"])
        assert prompt[first - 1] == ids["vision_start_token_id"] and prompt[first + 256] == ids["vision_end_token_id"]
        assert prompt.count(ids["image_token_id"]) == sum(s["mm_token_type_ids"]) == 256
        assert s["mm_token_type_ids"][first:first + 256] == [1] * 256
        assert s["pixel_values"].shape == (32 * 32, 3 * 2 * 14 * 14)
        assert s["image_grid_thw"].tolist() == [[1, 32, 32]]
        text = [t for t in prompt + s["completion_ids"] if t != ids["image_token_id"]]
        assert len(text) - 2 == sum(t < preset["first_special_id"] for t in text)  # only the 2 markers are special
    mb = T.collate(samples, preset["pad_id"])
    assert mb["input_ids"].shape == (2, 2048) and mb["completion_mask"].sum() == 2 * 1024
    assert mb["pixel_values"].shape == (2 * 1024, 1176) and mb["image_grid_thw"].tolist() == [[1, 32, 32]] * 2


def test_prompt_too_short_for_the_image_fails_loudly():
    with pytest.raises(ValueError, match="cannot hold the 256 image tokens"):
        B.synthetic_samples("3b", 1, 256, 64, 448, seed=0)
    with pytest.raises(ValueError, match="multiple of 28"):
        B.synthetic_samples("3b", 1, 2048, 1024, 450, seed=0)


def test_3b_preset_has_the_published_parameter_count():
    """Qwen2.5-VL-3B-Instruct: 3.75B parameters with tied embeddings (the docstring's N), built on
    the meta device (no memory, no weights)."""
    model = B.build_model("3b", seed=0, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert vision == 668_684_288  # patch embed + 32 blocks + merger: the docstring's 0.67B
