"""Fewer GPUs: a frozen vision tower, LoRA adapters (PEFT) with merged weights for vLLM and the
base model as KL reference, gradient checkpointing with the vision tower included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import train_grpo as T

ROOT = Path(__file__).resolve().parents[1]


def _policy(tiny_model_dir, mixed_precision="no", **kw):
    from accelerate import Accelerator

    args = T.Args(model=str(tiny_model_dir), max_pixels=50_176, learning_rate=1e-2, max_grad_norm=1e9,
                  micro_batch_size=2, warmup_ratio=0.0, **kw)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # one process, several Accelerators: precision differs per test
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    processor, model, ref, opt, sched = T.build_policy(args, accelerator, total_steps=10)
    return args, accelerator, model, ref, opt, sched


def _train(args, accelerator, model, ref, opt, sched, samples, pad, steps=2):
    for _ in range(steps):
        T.train_on_batch(model, ref, opt, sched, accelerator, samples, args, pad)


def test_frozen_vision_tower_gets_no_gradient_no_optimizer_state_and_no_sync(tiny_model_dir, demo_dir):
    from test_train_grpo import _fake_samples

    samples, pad = _fake_samples(tiny_model_dir, demo_dir)
    args, acc, model, ref, opt, sched = _policy(tiny_model_dir, freeze_vision_tower=True)
    before = {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters()}
    _train(args, acc, model, ref, opt, sched, samples, pad)
    after = dict(acc.unwrap_model(model).named_parameters())
    frozen = [n for n in before if ".visual." in f".{n}" and ".merger." not in n]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)  # bit-identical
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(after[n]) in in_opt for n in frozen)  # no optimizer state
    moved = [n for n in before if n not in frozen and not torch.equal(before[n], after[n])]
    assert any(".merger." in n for n in moved) and any("language_model" in n for n in moved)
    assert not any(".visual." in f".{n}" and ".merger." not in n for n in T.policy_weights(
        acc.unwrap_model(model), changed_only=True))  # the weight sync skips what did not change
    assert set(frozen) <= set(T.policy_weights(acc.unwrap_model(model)))  # ...unless vLLM slept (level 2)
    # --freeze_merger freezes the merger too
    args, acc, model, *_ = _policy(tiny_model_dir, freeze_vision_tower=True, freeze_merger=True)
    assert not any(p.requires_grad for n, p in acc.unwrap_model(model).named_parameters() if ".merger." in n)


def test_lora_trains_only_adapters_and_merges_exactly(tiny_model_dir, demo_dir):
    """Only the adapter weights move; the merged policy equals the adapted model (same logits);
    with the KL term on, the reference is the base model (adapters off), not a second copy."""
    from transformers import AutoModelForImageTextToText

    from test_train_grpo import _fake_samples

    samples, pad = _fake_samples(tiny_model_dir, demo_dir)
    args, acc, model, ref, opt, sched = _policy(tiny_model_dir, lora_r=4, kl_coef=0.1)
    assert isinstance(ref, T.AdapterOff)
    peft_model = acc.unwrap_model(model)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    _train(args, acc, model, ref, opt, sched, samples, pad)
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".lora_" in n for n in changed)
    assert not any(".visual." in n and ".lora_" in n for n in before)  # no adapters in the vision tower
    # merged weights: a plain model loaded with them gives the adapted model's logits
    merged = T.policy_weights(peft_model)
    plain = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    assert not unexpected and not [m for m in missing if "lm_head" not in m]
    mb = T.collate(samples, pad)
    with torch.no_grad():
        ours = T.forward_logps(peft_model, mb)
        assert torch.allclose(T.forward_logps(plain, mb), ours, atol=1e-5)
        base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
        assert torch.allclose(T.forward_logps(ref, mb), T.forward_logps(base, mb), atol=1e-6)  # adapters off
        assert not torch.allclose(T.forward_logps(ref, mb), ours, atol=1e-4)
    changed_only = T.policy_weights(peft_model, changed_only=True)
    assert changed_only and all(any(m in n for m in args.lora_target_modules) for n in changed_only)


def test_lora_base_loads_in_bf16_under_bf16_mixed_precision(tiny_model_dir, demo_dir):
    """The frozen base needs no float32 master copy: bf16 base, float32 adapters, and training runs."""
    from test_train_grpo import _fake_samples

    samples, pad = _fake_samples(tiny_model_dir, demo_dir)
    args, acc, model, ref, opt, sched = _policy(tiny_model_dir, mixed_precision="bf16", lora_r=4)
    params = dict(acc.unwrap_model(model).named_parameters())
    assert {p.dtype for n, p in params.items() if ".lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in params.items() if ".lora_" in n} == {torch.float32}
    before = {n: p.detach().clone() for n, p in params.items() if ".lora_B" in n}
    _train(args, acc, model, ref, opt, sched, samples, pad, steps=1)
    assert any(not torch.equal(before[n], params[n]) for n in before)
    # without bf16 mixed precision (CPU tests, fp32 runs) everything stays float32
    _, acc, model, *_ = _policy(tiny_model_dir, lora_r=4)
    assert {p.dtype for p in acc.unwrap_model(model).parameters()} == {torch.float32}


def test_gradient_checkpointing_covers_the_vision_tower(tiny_model_dir):
    _, acc, model, *_ = _policy(tiny_model_dir, gradient_checkpointing=True)
    m = acc.unwrap_model(model)
    assert m.model.visual.gradient_checkpointing and m.model.language_model.gradient_checkpointing
    _, acc, model, *_ = _policy(tiny_model_dir)  # default: on only where a GPU is present (here: off)
    assert acc.unwrap_model(model).model.visual.gradient_checkpointing is torch.cuda.is_available()


@pytest.mark.slow(seconds=73)
def test_zero_offload_lora_run_resumes_exactly_and_saves_adapter_and_merged_policy(tiny_model_dir, demo_dir, tmp_path):
    """The two halves of README "On fewer GPUs" in one launch (each launch costs ~30 s here):
    configs/deepspeed_zero2_offload.yaml (the optimizer in host RAM, DeepSpeed's CPU Adam; the README
    runs it as a full fine-tune) with the LoRA recipe's flags (LoRA, a frozen vision tower, KL on;
    the README runs those under configs/single_gpu.yaml, whose plain-accelerate checkpointing
    the end-to-end test launches). A 3-step run saves at step 2; its step-2 checkpoint resumed gives
    the same step 3. Checkpoints hold the adapter and a merged policy that loads as a plain
    Qwen2.5-VL equal to base + adapter. configs/deepspeed_zero2.yaml differs only in where the
    optimizer lives: tests/test_train_grpo.py::test_the_two_zero2_configs_differ_only_in_the_optimizers_place."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from test_train_grpo import deepspeed_launch, metrics, tiny_run_args

    extra = ["--save_every", "2", "--lora_r", "4", "--kl_coef", "0.05", "--freeze_vision_tower"]

    def launch(out, *more):
        return deepspeed_launch("deepspeed_zero2_offload.yaml",
                                tiny_run_args(tiny_model_dir, demo_dir, out, steps=3, extra=[*extra, *more]))

    full, part = tmp_path / "full", tmp_path / "part"
    launch(full)
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    res = launch(part, "--resume")
    assert "at step 2" in res.stdout
    states = torch.load(next((full / "checkpoint-3" / "accelerate").rglob("*optim_states.pt")), weights_only=False)
    assert states["ds_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"  # ZeRO-Offload ran
    assert int(states["optimizer_state_dict"]["zero_stage"]) == 2
    # gradients reduced and accumulated in float32 under bf16, as the official trainer does
    assert states["ds_config"]["communication_data_type"] == "fp32"
    assert states["ds_config"]["data_types"] == {"grad_accum_dtype": "fp32"}
    a, b = metrics(full)[-1], metrics(part)[-1]
    for key in ("reward/total", "train/loss", "train/kl", "train/grad_norm", "completion/length_mean",
                "rollout/vllm_kl"):
        assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert a["train/kl"] > 0
    ckpt = full / "checkpoint-3"
    assert (ckpt / "adapter" / "adapter_config.json").exists()
    merged = load_file(ckpt / "policy" / "model.safetensors")
    assert not any(".lora_" in k or "base_layer" in k for k in merged)
    # policy/ loads as a plain Qwen2.5-VL (same names and shapes as the base) equal to base + adapter
    plain = AutoModelForImageTextToText.from_pretrained(ckpt / "policy", dtype=torch.float32).state_dict()
    fresh = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert {n: t.shape for n, t in plain.items()} == {n: t.shape for n, t in fresh.items()}
    adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                        ckpt / "adapter")
    expect = T.policy_weights(adapted)
    assert expect.keys() <= plain.keys() and all(torch.allclose(plain[k], expect[k], atol=1e-6) for k in expect)
    assert any(not torch.equal(plain[k], fresh[k]) for k in plain)  # it trained
    wb = load_file(part / "checkpoint-3" / "policy" / "model.safetensors")
    assert all(torch.allclose(merged[k], wb[k], atol=1e-6) for k in merged)
