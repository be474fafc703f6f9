"""train_grpo.py: every reward and update equation against a naive loop written from the paper,
gradient-accumulation invariance, weight sync into vLLM, end-to-end runs, learning, resume,
and a dead judge stopping training."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_grpo as T

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Rewards on hand-computed cases
# ---------------------------------------------------------------------------------------------
GOOD = "<think>\nAB = 3 and BC = 5, so AC = 8.\n</think>\n<answer>\n\\boxed{8}\n</answer>"


@pytest.mark.parametrize("response, expected", [
    (GOOD, 1.0),
    ("<think>\nx\n</think>\n<answer>\nThe answer is \\boxed{x+1} units.\n</answer>", 1.0),
    ("<think>\nmulti\nline\n</think>\n<answer>\n\\boxed{8}\n</answer>", 1.0),
    ("<think>x</think>\n<answer>\n\\boxed{8}\n</answer>", 0.0),  # no newline after <think>
    (GOOD + "\n", 0.0),  # trailing text
    ("Sure! " + GOOD, 0.0),  # leading text
    ("<think>\nx\n</think>\n<answer>\n\\boxed{}\n</answer>", 0.0),  # empty box
    ("<think>\nx\n</think>\n<answer>\n8\n</answer>", 0.0),  # no box
    ("<think>\nx\n</think><answer>\n\\boxed{8}\n</answer>", 0.0),  # no newline between blocks
    ("", 0.0),
])
def test_format_reward(response, expected):
    assert T.format_reward(response) == expected


@pytest.mark.parametrize("response, answer, expected", [
    (GOOD, "8", 1.0),
    (GOOD.replace("{8}", "{9}"), "8", 0.0),
    (GOOD.replace("{8}", "{8.0}"), "8", 1.0),
    ("<think>\nx\n</think>\n<answer>\n\\boxed{\\frac{1}{2}}\n</answer>", "0.5", 1.0),
    # math-verify reads LaTeX gold only inside $...$ or \boxed (official: parse(gold) as stored)
    ("<think>\nx\n</think>\n<answer>\n\\boxed{4\\sqrt{2}}\n</answer>", "$4\\sqrt{2}$", 1.0),
    ("<think>\nx\n</think>\n<answer>\n\\boxed{4\\sqrt{2}}\n</answer>", "4\\sqrt{2}", 0.0),
    ("the answer is <answer>8</answer>", "8", 1.0),  # one-line block: the official regex matches
    ("no answer at all", "8", 0.0),
    ("", "8", 0.0),
])
def test_accuracy_reward(response, answer, expected):
    assert T.accuracy_reward(response, answer) == expected


def test_accuracy_reward_parses_whole_response_by_default():
    # Official regex lacks DOTALL: a multi-line <answer> block is not extracted, the whole
    # response is parsed, and math-verify takes the last \boxed (here inside <answer>).
    resp = "<think>\nmaybe \\boxed{3}\n</think>\n<answer>\n\\boxed{8}\n</answer>"
    assert T.accuracy_reward(resp, "8") == 1.0
    # with DOTALL extraction only the <answer> block counts
    assert T.accuracy_reward(resp, "8", answer_dotall=True) == 1.0


def naive_repetition(response, n=20, max_penalty=-2.0):
    words = response.lower().split()
    if len(words) < n:
        return 0.0
    seen, total = [], 0
    for i in range(len(words) - n + 1):
        total += 1
        g = " ".join(words[i:i + n])
        if g not in seen:
            seen.append(g)
    return max_penalty * (1 - len(seen) / total)


def test_repetition_penalty_hand_computed_and_vs_naive():
    assert T.repetition_penalty("") == 0.0
    assert T.repetition_penalty("word " * 19) == 0.0  # fewer than 20 words
    assert T.repetition_penalty(" ".join(f"w{i}" for i in range(50))) == 0.0  # all distinct
    # 40 identical words: 21 twenty-grams, 1 distinct -> -2 * (1 - 1/21)
    assert T.repetition_penalty("Same " * 40) == pytest.approx(-2.0 * (1 - 1 / 21))
    # case-insensitive
    assert T.repetition_penalty("A a " * 20) == T.repetition_penalty("a a " * 20)
    import random

    rng = random.Random(0)
    for _ in range(50):
        text = " ".join(rng.choice(["x", "y", "z", "AB", "=", "3"]) for _ in range(rng.randint(0, 80)))
        for n in (2, 5, 20):
            assert T.repetition_penalty(text, n) == pytest.approx(naive_repetition(text, n))


def test_mix_rewards_uses_paper_weights():
    args = T.Args()
    assert (args.w_acc, args.w_fmt, args.w_vis) == (0.9, 0.1, 0.7)
    R = T.mix_rewards(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([-0.2]),
                      args.w_acc, args.w_fmt, args.w_vis)
    assert R.item() == pytest.approx(0.9 + 0.1 + 0.35 - 0.2)


def test_failed_judgements_are_imputed_with_the_group_mean_not_zero():
    r_v, failed = T.impute_failed_judgements([1.0, None, 0.5, 0.0, None, None], group_size=3)
    assert failed.tolist() == [False, True, False, False, True, True]
    assert r_v.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# Advantages, loss, KL, log-probs against naive loops
# ---------------------------------------------------------------------------------------------
def test_group_advantages_vs_naive():
    torch.manual_seed(0)
    G = 4
    rewards = torch.rand(5 * G)
    rewards[:G] = 0.7  # a zero-spread group -> zeros
    adv = T.group_advantages(rewards, G)
    for b in range(5):
        group = rewards[b * G:(b + 1) * G].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        for g in range(G):
            assert adv[b * G + g].item() == pytest.approx((group[g] - mean) / (std + 1e-6), abs=1e-5)
    assert adv[:G].abs().max().item() < 1e-4


def naive_policy_loss(logps, old, adv, mask, el, eh, c, agg):
    per_seq, total, count = [], 0.0, 0.0
    for i in range(len(logps)):
        s, n = 0.0, 0.0
        for t in range(len(logps[0])):
            if mask[i][t] == 0:
                continue
            r = math.exp(logps[i][t] - old[i][t])
            a = adv[i]
            loss = max(-a * r, -a * min(max(r, 1 - el), 1 + eh))
            if a < 0:
                loss = min(loss, -a * c)
            s += loss
            n += 1
        total += s
        count += n
        per_seq.append(s / max(n, 1))
    return total / count if agg == "token-mean" else sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_vs_naive(agg):
    torch.manual_seed(1)
    N, C = 6, 7
    logps = -torch.rand(N, C) * 3
    old = logps + torch.randn(N, C) * 0.8  # ratios well outside the clip range too
    adv = torch.tensor([1.5, -2.0, 0.3, -0.1, 0.0, -3.0])
    mask = (torch.rand(N, C) > 0.3).float()
    mask[:, 0] = 1
    loss, stats = T.policy_loss(logps, old, adv, mask, 0.2, 0.3, 3.0, agg)
    expected = naive_policy_loss(logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.3, 3.0, agg)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert 0 < stats["clip_frac"].item() < 1


def test_policy_loss_gradient_is_advantage_weighted_at_ratio_one():
    # on-policy (old = logp.detach()): d loss / d logp_t = -A / num_tokens for every token
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.ones(2, 2)
    loss, _ = T.policy_loss(logps, logps.detach(), adv, mask)
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[-0.5, -0.5], [0.25, 0.25]]))


def test_k3_kl_vs_naive():
    torch.manual_seed(2)
    logp, ref = -torch.rand(3, 5) * 4, -torch.rand(3, 5) * 4
    k3 = T.k3_kl(logp, ref)
    for i in range(3):
        for t in range(5):
            d = max(min(ref[i, t].item() - logp[i, t].item(), 20.0), -20.0)
            expected = min(math.exp(d) - d - 1, 10.0)  # EasyR1's "low_var_kl" clamps to 10
            assert k3[i, t].item() == pytest.approx(expected, rel=1e-5)
    assert (k3 >= 0).all() and T.k3_kl(logp, logp).abs().max() == 0


def test_token_logps_matches_full_log_softmax():
    torch.manual_seed(3)
    logits = torch.randn(3, 5, 11)
    targets = torch.randint(0, 11, (3, 5))
    logps, ent = T.token_logps(logits, targets, with_entropy=True)
    full = logits.log_softmax(-1)
    assert torch.allclose(logps, full.gather(-1, targets.unsqueeze(-1)).squeeze(-1), atol=1e-6)
    assert torch.allclose(ent, -(full.exp() * full).sum(-1), atol=1e-5)


def test_batch_indices_is_a_per_epoch_permutation_with_drop_last():
    n, B = 10, 3  # 3 steps per epoch, 1 row dropped each epoch
    epoch0 = [i for s in range(3) for i in T.batch_indices(n, s, B, seed=5)]
    epoch1 = [i for s in range(3, 6) for i in T.batch_indices(n, s, B, seed=5)]
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9 and epoch0 != epoch1
    assert T.batch_indices(n, 4, B, seed=5) == T.batch_indices(n, 4, B, seed=5)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation: 1 micro-batch of k == k micro-batches of 1
# ---------------------------------------------------------------------------------------------
def _fake_samples(model_dir, demo_dir, n=4):
    from transformers import AutoProcessor

    import data

    processor = AutoProcessor.from_pretrained(model_dir)
    row = data.load_rows(str(demo_dir / "train.jsonl"))[0]
    imgs = data.row_images(row, 3136, 50_176)
    enc = processor(text=[data.build_prompt(processor, row["problem"], 1)], images=imgs, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        comp = torch.randint(10, 600, (3 + 2 * i,), generator=g).tolist()  # different lengths
        samples.append({"prompt_ids": enc["input_ids"][0].tolist(), "completion_ids": comp,
                        "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"],
                        "advantage": [1.0, -0.5, 0.3, -1.2][i % 4]})
    return samples, processor.tokenizer.pad_token_id


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_accumulation_invariance(tiny_model_dir, demo_dir, agg):
    from accelerate import Accelerator
    from transformers import AutoModelForImageTextToText

    samples, pad = _fake_samples(tiny_model_dir, demo_dir)
    grads = []
    for mbs in (4, 1):
        accelerator = Accelerator(cpu=True)
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        model, opt, sched = accelerator.prepare(model, opt, sched)
        args = T.Args(micro_batch_size=mbs, loss_agg=agg, max_grad_norm=1e9)
        T.train_on_batch(model, None, opt, sched, accelerator, samples, args, pad)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Weight sync: after pushing new weights, vLLM agrees with the HF policy
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_weight_sync_makes_vllm_agree_with_the_policy(tiny_model_dir, demo_dir, tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from vllm import SamplingParams

    import data

    accelerator = Accelerator(cpu=True)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    args = T.Args(model=str(tiny_model_dir), max_prompt_length=1024, max_response_length=64, max_pixels=50_176)
    llm = T.build_vllm(args, 0, 1, 1)
    row = data.load_rows(str(demo_dir / "test.jsonl"))[1]
    imgs = data.row_images(row, 3136, 50_176)
    prompt = data.build_prompt(processor, row["problem"], 1)
    inputs = processor(text=[prompt], images=imgs, return_tensors="pt")
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def vllm_tokens(tag):
        req = {"prompt": prompt, "multi_modal_data": {"image": imgs}, "multi_modal_uuids": {"image": [tag]}}
        return list(llm.generate([req], greedy, use_tqdm=False)[0].outputs[0].token_ids)

    def hf_tokens():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    before = vllm_tokens("a")
    assert before == hf_tokens()
    with torch.no_grad():  # a large change to every weight, vision tower included
        g = torch.Generator().manual_seed(7)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * (p.std() if p.numel() > 1 else 1.0))
    after_hf = hf_tokens()
    assert after_hf != before
    T.sync_weights_to_vllm(accelerator, model, llm)
    assert vllm_tokens("b") == after_hf


# ---------------------------------------------------------------------------------------------
# End-to-end runs (subprocesses, like a user)
# ---------------------------------------------------------------------------------------------
def tiny_run_args(model_dir, demo_dir, out, steps=3, extra=()):
    return [sys.executable, str(ROOT / "train_grpo.py"), "--model", str(model_dir),
            "--dataset", str(demo_dir / "train.jsonl"), "--dtype", "float32",
            "--max_pixels", "50176", "--max_prompt_length", "1024", "--max_response_length", "48",
            "--prompts_per_step", "4", "--group_size", "4", "--micro_batch_size", "8",
            "--max_steps", str(steps), "--learning_rate", "1e-3", "--warmup_ratio", "0",
            "--judge.backend", "lexical", "--output_dir", str(out), "--sample_every", "2", *extra]


def run(cmd, timeout=600, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_end_to_end_run_writes_a_loadable_checkpoint_and_changes_weights(tiny_model_dir, demo_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    res = run(tiny_run_args(tiny_model_dir, demo_dir, out, steps=2, extra=["--save_every", "1"]))
    assert "samples at step 2" in res.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/total", "reward/accuracy", "reward/format", "reward/visual", "reward/repetition",
                "adv/zero_spread_groups", "train/loss", "train/entropy", "train/clip_frac", "train/grad_norm",
                "completion/length_mean", "perf/step_s", "judge/failure_rate"):
        assert key in rows[-1], key
    assert list((out / "tensorboard").iterdir())
    ckpt = out / "checkpoint-2"
    assert (ckpt / "policy" / "model.safetensors").exists() and (ckpt / "state.json").exists()
    assert not list(out.glob(".checkpoint-*"))  # no temp folder left behind
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(ckpt / "policy" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert any("visual" in k for k in changed)  # the vision tower trains too (paper)


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(tiny_model_dir, demo_dir, tmp_path):
    full = tmp_path / "full"
    run(tiny_run_args(tiny_model_dir, demo_dir, full, steps=4, extra=["--save_every", "2"]))
    # same run, killed after its step-2 checkpoint is written
    part = tmp_path / "part"
    proc = subprocess.Popen(tiny_run_args(tiny_model_dir, demo_dir, part, steps=4, extra=["--save_every", "2"]),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (part / "checkpoint-2" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-2 checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (part / "checkpoint-4").exists()
    run(tiny_run_args(tiny_model_dir, demo_dir, part, steps=4, extra=["--save_every", "2", "--resume"]))
    full_rows = {r["step"]: r for r in metrics(full)}
    part_rows = {r["step"]: r for r in metrics(part)}
    for step in (3, 4):
        for key in ("reward/total", "reward/visual", "completion/length_mean", "train/loss", "train/entropy"):
            assert part_rows[step][key] == pytest.approx(full_rows[step][key], rel=1e-4, abs=1e-6), (step, key)
    from safetensors.torch import load_file

    a = load_file(full / "checkpoint-4" / "policy" / "model.safetensors")
    b = load_file(part / "checkpoint-4" / "policy" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_dead_judge_endpoint_stops_training_with_a_clear_error(tiny_model_dir, demo_dir, tmp_path):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    cmd = tiny_run_args(tiny_model_dir, demo_dir, tmp_path / "dead", steps=2)
    cmd[cmd.index("lexical")] = "openai"
    cmd += ["--judge.base_urls", url, "--judge.timeout_s", "2", "--judge.max_retries", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode != 0
    assert url.rsplit("/v1", 1)[0] in out.stderr
    assert not (tmp_path / "dead" / "metrics.jsonl").exists()  # no step trained on zeros


@pytest.mark.slow
def test_bad_row_fails_before_training_naming_the_row(tiny_model_dir, demo_dir, tmp_path):
    import data

    rows = data.read_jsonl(demo_dir / "train.jsonl")[:8]
    for r in rows:
        r["images"] = [str(demo_dir / r["images"][0])]
    rows[5]["visual_key_info"] = ""
    data.write_jsonl(tmp_path / "bad.jsonl", rows)
    cmd = tiny_run_args(tiny_model_dir, demo_dir, tmp_path / "bad", steps=1)
    cmd[cmd.index(str(demo_dir / "train.jsonl"))] = str(tmp_path / "bad.jsonl")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode != 0 and "row 5 (id=demo-train-00005)" in out.stderr and "visual_key_info" in out.stderr


def test_help_documents_every_option():
    out = run([sys.executable, str(ROOT / "train_grpo.py"), "--help"], timeout=120)
    text = out.stdout.replace("_", "-")
    for opt in ("--group-size", "--clip-eps-high", "--dual-clip", "--kl-coef", "--w-vis", "--judge.backend",
                "--resume", "--micro-batch-size", "--vllm-sleep"):
        assert opt in text, opt
    assert text.count("official") >= 15  # defaults cite the official script


# ---------------------------------------------------------------------------------------------
# Learning: GRPO raises the mean reward of a warm-started tiny model
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_learning_mean_reward_rises(tmp_path):
    """A warm-started tiny model writes the <think>/<answer> layout about a quarter of the time;
    GRPO on the format reward alone (w_fmt=1, the others 0) must raise it clearly within two
    30 steps of 16 prompts x 8 samples. Measured here (first 5 steps -> last 5 steps):
    0.36 -> 0.69 with seed 1 (the default), 0.38 -> 0.54 with seed 2."""
    from demo_data import generate
    from tiny_model import build_tiny_model, warm_start

    demo_dir = generate(tmp_path / "demo", num_train=256, num_test=0, seed=0, parquet=False)  # as `make demo`
    model = build_tiny_model(tmp_path / "warm", seed=0)
    warm_start(model, demo_dir / "train.jsonl", steps=150, lr=3e-3, max_pixels=50_176)
    out = tmp_path / "learn"
    cmd = tiny_run_args(model, demo_dir, out, steps=30,
                        extra=["--sample_every", "0", "--save_every", "0", "--w_acc", "0", "--w_vis", "0",
                               "--w_fmt", "1"])
    for flag, value in (("--prompts_per_step", "16"), ("--group_size", "8"), ("--max_response_length", "96"),
                        ("--learning_rate", "2e-4"), ("--micro_batch_size", "32")):
        cmd[cmd.index(flag) + 1] = value
    run(cmd, timeout=900)
    rewards = [r["reward/total"] for r in metrics(out)]
    assert rewards == [r["reward/format"] for r in metrics(out)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards


# ---------------------------------------------------------------------------------------------
# Distributed: the same file under `accelerate launch --num_processes 2`
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_accelerate_launch_two_processes(tiny_model_dir, demo_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = tiny_run_args(tiny_model_dir, demo_dir, out, steps=2, extra=["--save_every", "0"])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "--main_process_port",
              str(__import__("conftest").free_port())]
    run(launch + cmd[1:], timeout=600)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]  # one log line per step: only rank 0 writes
    assert (out / "checkpoint-2" / "policy" / "model.safetensors").exists()


def test_forward_logps_equals_a_full_log_softmax(tiny_model_dir, demo_dir):
    from transformers import AutoModelForImageTextToText

    samples, pad = _fake_samples(tiny_model_dir, demo_dir)
    samples[1]["prompt_ids"] = samples[1]["prompt_ids"][:-3] + samples[1]["prompt_ids"][-2:]  # shorter prompt
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    mb = T.collate(samples, pad)
    with torch.no_grad():
        logps = T.forward_logps(model, mb)
        full = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], pixel_values=mb["pixel_values"],
                     image_grid_thw=mb["image_grid_thw"]).logits.log_softmax(-1)
    for i, s in enumerate(samples):
        P = len(s["prompt_ids"])
        for t, tok in enumerate(s["completion_ids"]):
            assert logps[i, t].item() == pytest.approx(full[i, P - 1 + t, tok].item(), abs=1e-4)
