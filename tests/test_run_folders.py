"""train_grpo.py's output folder: one live run per folder (an OS lock), no silent appending to an
earlier run, logs that hold each step once across a kill and --resume, settings compared on
resume, and names (model, dataset) that fail in seconds when they are neither a local path nor a
reachable hub id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data
from conftest import ROOT, free_port
from test_train_grpo import metrics, run, tiny_run_args


def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """Steps of one scalar as TensorBoard shows it (purged events dropped, as its reader does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), purge_orphaned_data=True)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _fails(cmd, timeout=120, env=None) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert res.returncode != 0, res.stdout[-2000:]
    return res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# A kill, a second run on the live folder, the resume, and what the folder refuses afterwards
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow(seconds=75)
def test_kill_resume_logs_each_step_once_and_a_live_folder_is_locked(tiny_model_dir, demo_dir, tmp_path):
    """A 4-step run (checkpoint every 2, validation every step) SIGKILLed after it logged step 3:
    its log then holds 0 1 2 3 and checkpoint-2 is the newest. While it was alive, a second run on
    the same folder stopped at once, naming the folder and the live run's pid. --resume drops the
    killed run's step 3 (metrics row, val/step-3.jsonl, TensorBoard events) and redoes it, so that
    every log holds 0 1 2 3 4 once each, in order. Then: the same command without --resume is
    refused, and --resume with another learning rate lists the difference and stops."""
    out = tmp_path / "run"
    cmd = tiny_run_args(tiny_model_dir, demo_dir, out, steps=4,
                        extra=["--save_every", "2", "--val_dataset", str(demo_dir / "test.jsonl"),
                               "--val_limit", "2", "--val_every", "1", "--sample_every", "0"])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (out / ".lock").exists() or not (out / ".lock").read_text().strip():
            assert proc.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.1)
        t0 = time.time()
        second = _fails(cmd + ["--resume"], timeout=60)  # the mistake seen: a resume of a live run
        assert time.time() - t0 < 45  # stops before loading any model or engine
        assert f"{out} is in use by another run (pid {proc.pid}:" in second
        deadline = time.time() + 300
        while not [r for r in data.read_jsonl(out / "metrics.jsonl") if r["step"] == 3]:
            assert proc.poll() is None and time.time() < deadline, "run ended before logging step 3"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3]
    assert (out / "checkpoint-2").exists() and not (out / "checkpoint-4").exists()
    killed_val3 = (out / "val" / "step-3.jsonl").stat().st_mtime_ns

    res = run(cmd + ["--resume"])  # the killed run left its lock file: the OS dropped the lock
    assert "resumed from" in res.stdout and "checkpoint-2 at step 2" in res.stdout
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (out / "val").iterdir()) == [f"step-{s}.jsonl" for s in range(5)]
    assert (out / "val" / "step-3.jsonl").stat().st_mtime_ns > killed_val3  # redone, not kept
    assert _tensorboard_steps(out / "tensorboard", "reward/total") == [1, 2, 3, 4]
    assert _tensorboard_steps(out / "tensorboard", "val/accuracy") == [0, 1, 2, 3, 4]
    assert "summary: 4 steps" in res.stdout

    again = _fails(cmd)  # the same command once more, without --resume: refused, nothing touched
    assert f"{out} holds a run (checkpoint-2, checkpoint-4, metrics.jsonl" in again
    assert "pass --resume to continue it, --overwrite to delete it" in again
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3, 4]
    lr = cmd.index("--learning_rate") + 1
    changed = _fails(cmd[:lr] + ["2e-3"] + cmd[lr + 1:] + ["--resume", "--max_steps", "5"])
    assert "--resume: these settings differ from" in changed and "learning_rate: 0.001 -> 0.002" in changed
    assert "--resume_with_changes" in changed
    state = json.loads((out / "checkpoint-4" / "state.json").read_text())
    assert state["step"] == 4 and state["args"]["learning_rate"] == 1e-3
    settings = data.read_train_settings(out / "checkpoint-4" / "policy")
    assert settings["max_pixels"] == 50176 and settings["task"] == "geometry"
    assert settings["instruction"] == data.INSTRUCTION


@pytest.mark.slow(seconds=30)
def test_overwrite_starts_afresh_and_resume_of_an_empty_folder_says_so(tiny_model_dir, demo_dir, tmp_path):
    """--resume on a folder without a checkpoint says it starts fresh; --overwrite on a folder
    holding a run deletes its checkpoints and logs first (the metrics do not wrap back to step 1)."""
    out = tmp_path / "run"
    cmd = tiny_run_args(tiny_model_dir, demo_dir, out, steps=1, extra=["--sample_every", "0"])
    res = run(cmd + ["--resume"])
    assert f"--resume: no checkpoint in {out}, starting fresh" in res.stdout
    (out / "val").mkdir()
    (out / "val" / "step-7.jsonl").write_text("{}\n")  # left from some earlier run
    res = run(cmd + ["--overwrite", "--max_steps", "2", "--save_every", "0"])
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "val").exists()


# ---------------------------------------------------------------------------------------------
# Names that are neither local paths nor reachable hub ids: seconds, not minutes of retries
# ---------------------------------------------------------------------------------------------
def test_a_mistyped_model_fails_in_seconds_before_the_judge(tiny_model_dir, demo_dir, tmp_path):
    """With the default (openai) judge at an address where nothing listens, a typo in --model is
    reported as such, before the judge's health check and before any model loads."""
    cmd = [sys.executable, str(ROOT / "train_grpo.py"), "--model", "tiny_modl", "--dataset",
           str(demo_dir / "train.jsonl"), "--output_dir", str(tmp_path / "out"),
           "--judge.base_urls", f"http://127.0.0.1:{free_port()}/v1"]
    t0 = time.time()
    text = _fails(cmd)
    assert time.time() - t0 < 60
    assert "--model 'tiny_modl' is not found locally" in text and cmd[-1] not in text
    typo = _fails(cmd[:3] + [str(tiny_model_dir), "--dataset", "demo_data/trian"] + cmd[6:])
    assert "'demo_data/trian' is not found locally" in typo and "HF_HUB_OFFLINE=1" in typo


def test_check_source_local_paths_checkpoints_and_the_hub(tiny_model_dir, tmp_path):
    assert data.check_source(str(tiny_model_dir)) == str(tiny_model_dir)
    ckpt = tmp_path / "checkpoint-3"
    (ckpt / "policy").mkdir(parents=True)
    (ckpt / "policy" / "config.json").write_text("{}")
    assert data.check_source(str(ckpt)) == str(ckpt / "policy")  # a checkpoint points to policy/
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json, so not a model"):
        data.check_source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not a hub id of the form owner/name"):
        data.check_source("tiny_modl")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1 forbids the hub"):
        data.check_source("someone/not-cached", kind="dataset", flag="--dataset")


def test_check_source_with_the_hub_unreachable_fails_fast(tmp_path):
    """The hub allowed but unreachable (an endpoint where nothing listens): a clear message in
    seconds, naming HF_HUB_OFFLINE, instead of the hub client's retries."""
    code = ("import data\ntry:\n    data.check_source('demo_data/trian', kind='dataset', flag='--dataset')\n"
            "except FileNotFoundError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HOME": str(tmp_path / "hf")}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=60)
    assert time.time() - t0 < 30
    assert "not found locally, and the hub is unreachable" in res.stdout, res.stdout + res.stderr
    assert "HF_HUB_OFFLINE=1" in res.stdout


def test_lock_folder_refuses_a_second_holder_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import data, sys, time\n"
                               f"fh = data.lock_folder({str(tmp_path)!r}); print('held', flush=True)\n"
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(data.FolderInUse, match=rf"{tmp_path} is in use by another run \(pid {holder.pid}:"):
            data.lock_folder(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    fh = data.lock_folder(tmp_path)  # the OS dropped the killed process's lock
    assert f"pid {os.getpid()}:" in (tmp_path / ".lock").read_text()
    fh.close()


def test_the_end_of_run_plot_shows_validation_from_step_0(tmp_path):
    import train_grpo as T

    rows = [{"step": 0, "val/accuracy": 0.1, "val/n": 4.0},
            {"step": 1, "reward/total": 0.2, "val/accuracy": 0.3},
            {"step": 2, "reward/total": 0.4, "val/accuracy": 0.5}]
    fig = T.plot_metrics(rows, tmp_path / "rewards.png")
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert sorted(panels) == ["reward/total", "val/accuracy"]  # val/n is a count, not plotted
    assert list(panels["val/accuracy"].lines[0].get_xdata()) == [0, 1, 2]
    assert list(panels["reward/total"].lines[0].get_xdata()) == [1, 2]
    assert (tmp_path / "rewards.png").stat().st_size > 1000
