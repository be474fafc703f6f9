"""annotate.py: the three stages end to end against a scripted OpenAI-compatible server, the wire
format against a real `vllm serve`, resume after SIGKILL, bad rows, fact normalisation."""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import annotate
import data
from conftest import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server (conftest.FakeOpenAI answering from scripts)
# ---------------------------------------------------------------------------------------------
class FakeServer(FakeOpenAI):
    """Answers deterministically from scripts. distil requests (with an image) are matched by the
    sha256 of their image data URL: `distil[sha] = [reply for request 1, reply for request 2, ...]`
    (the last one repeats). extract requests (text only) are matched by a solution string contained
    in the user text: `extract[solution] = reply`. Anything unmatched gets HTTP 400. Image requests
    are checked for the OpenAI wire format (a PNG data URL that PIL can verify)."""

    def __init__(self, delay_s: float = 0.0):
        self.distil: dict[str, list[str]] = {}
        self.extract: dict[str, str] = {}
        self.delay_s = delay_s
        self.seen: collections.Counter = collections.Counter()
        super().__init__(self._reply)

    async def _reply(self, body):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        user = body["messages"][-1]["content"]
        if not isinstance(user, list):
            return next((r for sol, r in self.extract.items() if sol in user), None)
        urls = [p["image_url"]["url"] for p in user if p["type"] == "image_url"]  # multimodal: text + image
        assert urls and all(u.startswith("data:image/png;base64,") for u in urls)
        from PIL import Image

        Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1]))).verify()
        sha = hashlib.sha256(urls[0].encode()).hexdigest()
        with self.lock:
            n = self.seen[sha]
            self.seen[sha] += 1
        script = self.distil.get(sha)
        return None if script is None else script[min(n, len(script) - 1)]


def sha_of_row_image(path, args: annotate.Args) -> str:
    """The sha the server will see: annotate's own encoding of the resized image."""
    img = data.resize_image(data.open_image(path), args.min_pixels, args.max_pixels)
    return hashlib.sha256(annotate.image_data_url(img).encode()).hexdigest()


def wrong(solution: str) -> str:
    return solution.rsplit("\\boxed{", 1)[0] + "\\boxed{98765}\n</answer>"


def extract_reply(i: int, facts: list[str]) -> str:
    """Well-formed, unnumbered, duplicated + empty, badly numbered, or no facts at all."""
    kind = i % 5
    if kind == 0:
        return "\n".join(f"<info{k}>{f}</info{k}>" for k, f in enumerate(facts, 1))
    if kind == 1:
        return "Here are the facts:\n" + "\n".join(f"<info>{f}</info>" for f in facts)
    if kind == 2:
        tags = [f"<info{k}>{f}</info{k}>" for k, f in enumerate(facts, 1)]
        return "\n".join(tags + ["<info9>   </info9>", f"<info10>{facts[0].upper()} </info10>"])
    if kind == 3:
        return "\n".join(f"<info{k * 3}>  {f}\n</info{k * 3}>" for k, f in enumerate(facts, 1))
    return "The solution does not rely on any diagram facts."


def args_for(server: FakeServer, **kw) -> annotate.Args:
    base = dict(distil_base_urls=(server.base_url,), distil_model="fake-vlm",
                extract_base_urls=(server.base_url,), extract_model="fake-llm",
                max_concurrency=4, timeout_s=20, max_retries=0, min_pixels=3136, max_pixels=3136 * 16)
    base.update(kw)
    return annotate.Args(**base)


def check_export(out_dir: Path, expected_keys: set[str]) -> list[dict]:
    """train.jsonl and train.parquet load via data.load_rows, fit the schema, same rows, images open."""
    rows_j = data.load_rows(str(out_dir / "train.jsonl"))
    rows_p = data.load_rows(str(out_dir / "train.parquet"))
    assert {r["key"] for r in rows_j} == expected_keys
    assert [r["key"] for r in rows_p] == [r["key"] for r in rows_j]
    for row in rows_j + rows_p:
        data.check_row(row, require_facts=True)
        assert data.IMAGE_PLACEHOLDER in row["problem"]
        data.row_images(row, 3136, 3136 * 4)
        facts = annotate.split_annotations(row["visual_key_info"])
        assert row["visual_key_info"] == annotate.format_facts(facts)  # numbered 1..m
        assert len({f.lower() for f in facts}) == len(facts)
        for key in ("solution", "distil_model", "extract_model", "distil_at", "filter_at", "extract_at"):
            assert row[key], key
    return rows_j


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
def test_normalise_facts():
    assert annotate.normalise_facts("<info1>a</info1><info1>A </info1><info3></info3><info>b</info>") == ["a", "b"]
    assert annotate.normalise_facts("no tags\n- AB = 3") == []
    assert annotate.normalise_facts(None) == []
    assert annotate.format_facts(["x", "y"]) == "<info1>x</info1>\n<info2>y</info2>"



def test_parquet_input_with_image_bytes_and_duplicate_ids(demo_dir, tmp_path):
    """Parquet stores images as {"bytes", "path"}; they are saved as PNG files next to the output."""
    rows = data.load_rows(str(demo_dir / "train.parquet"), limit=3)
    with FakeServer() as srv:
        args = args_for(srv, input=str(demo_dir / "train.parquet"), limit=3, output_dir=str(tmp_path))
        for r in rows:
            img = data.resize_image(data.open_image(r["images"][0]), args.min_pixels, args.max_pixels)
            srv.distil[hashlib.sha256(annotate.image_data_url(img).encode()).hexdigest()] = [r["solution"]]
        assert annotate.run_distil(args)["distil/ok"] == 3
    for rec in data.read_jsonl(tmp_path / "distil.jsonl"):
        assert rec["images"] == [f"images/{rec['key']}_0.png"] and (tmp_path / rec["images"][0]).exists()
    dup = tmp_path / "dup.jsonl"
    data.write_jsonl(dup, [{"id": 1, "problem": "p", "answer": "1", "images": []}] * 2)
    with pytest.raises(ValueError, match="share the id"):
        annotate.load_problems(annotate.Args(input=str(dup)))
    assert [r["_key"] for r in annotate.load_problems(annotate.Args(input=str(dup), id_field=""))] == ["#0", "#1"]


def test_pipeline_demo_end_to_end(demo_dir, tmp_path):
    rows = data.read_jsonl(demo_dir / "train.jsonl")[:15]
    # Bad rows, each must become an error record naming the row: missing image file, corrupt
    # image, missing answer.
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    bad = [{**rows[0], "id": "bad-missing-image", "images": ["images/nope.png"]},
           {**rows[0], "id": "bad-corrupt-image", "images": [str(tmp_path / "corrupt.png")]},
           {k: v for k, v in rows[0].items() if k != "answer"} | {"id": "bad-no-answer"}]
    for r in rows + bad[:1] + bad[2:]:  # absolute image paths: the input file lives in tmp_path
        r["images"] = [str(demo_dir / p) if not os.path.isabs(p) else p for p in r["images"]]
    bad[0]["images"] = [str(tmp_path / "images/nope.png")]
    inp = tmp_path / "input.jsonl"
    data.write_jsonl(inp, rows + bad)

    with FakeServer() as srv:
        args = args_for(srv, input=str(inp), output_dir=str(tmp_path / "out"), k=2)
        expected_kept, expected_ok = set(), set()
        for i, r in enumerate(rows):
            sha = sha_of_row_image(r["images"][0], args)
            # i % 4: 0 correct, 1 both wrong (dropped), 2 wrong then correct, 3 correct
            srv.distil[sha] = {0: [r["solution"]], 1: [wrong(r["solution"])],
                               2: [wrong(r["solution"]), r["solution"]], 3: [r["solution"]]}[i % 4]
            srv.extract[r["solution"]] = extract_reply(i, annotate.split_annotations(r["visual_key_info"]))
            if i % 4 != 1:
                expected_kept.add(r["id"])
                if i % 5 != 4:
                    expected_ok.add(r["id"])
        summary = annotate.run("all", args)
        n_requests = len(srv.requests)

        assert summary["filter/total"] == len(rows) and summary["filter/kept"] == len(expected_kept)
        out = check_export(tmp_path / "out", expected_ok)
        for r in out:  # the chosen solution is a correct one; facts are the scripted ones
            src = next(x for x in rows if x["id"] == r["id"])
            assert r["solution"] == src["solution"]
            assert annotate.split_annotations(r["visual_key_info"]) == annotate.split_annotations(src["visual_key_info"])
        # errors: 3 bad rows in distil, the no-facts rows in extract; each names its row
        errs = {e["key"]: e for e in annotate.error_summary(args)}
        assert {k for k, e in errs.items() if e["stage"] == "distil"} == {b["id"] for b in bad}
        assert "image file not found" in errs["bad-missing-image"]["error"]
        assert "cannot be opened" in errs["bad-corrupt-image"]["error"]
        assert "'answer'" in errs["bad-no-answer"]["error"] and "id=bad-no-answer" in errs["bad-no-answer"]["error"]
        no_facts = expected_kept - expected_ok
        assert {k for k, e in errs.items() if e["stage"] == "extract"} == no_facts
        assert all("no <infoK> fact" in errs[k]["error"] for k in no_facts)
        # the extractor is text-only; the solver got one image part and the training instruction
        assert all(isinstance(b["messages"][-1]["content"], str) for b in srv.requests
                   if b["model"] == "fake-llm")
        texts = [p["text"] for b in srv.requests if b["model"] == "fake-vlm"
                 for p in b["messages"][0]["content"] if p["type"] == "text"]
        assert texts and all(data.INSTRUCTION in t for t in texts)

        # a re-run sends nothing and changes nothing
        before = {s: annotate.stage_path(args, s).read_text() for s in ("distil", "filter", "extract")}
        annotate.run("all", args)
        assert len(srv.requests) == n_requests
        assert before == {s: annotate.stage_path(args, s).read_text() for s in ("distil", "filter", "extract")}


def test_pipeline_geometry3k_slice_cli(shared_data, tmp_path):
    """Real Geometry3K rows (single `image` column, no <image> in the problem), via the CLI main."""
    src = shared_data / "geometry3k" / "geometry3k_slice.jsonl"
    from train_grpo import accuracy_reward

    rows = data.read_jsonl(src)[:6]
    kept = set()
    with FakeServer() as srv:
        args = args_for(srv)
        for i, r in enumerate(rows):
            sol = (f"<think>\nFrom the diagram and the problem: {r['problem']} "
                   f"Working it through gives {r['answer']}.\n</think>\n<answer>\n\\boxed{{{r['answer']}}}\n</answer>")
            srv.distil[sha_of_row_image(src.parent / r["image"], args)] = [sol if i != 2 else wrong(sol)]
            # The filter is exactly the training reward, with the same gold policy: row 4's bare LaTeX
            # "5 \\sqrt { 3 }" is read as 5*sqrt(3) by default, so its right solution is kept.
            if i != 2 and accuracy_reward(sol, r["answer"]) == 1.0:
                kept.add(str(r["id"]))
            facts = [f.replace("Equals", "") for f in r["diagram_logic_forms"][:3]] or [r["problem"]]
            srv.extract[sol] = "\n".join(f"<info{k}>{f}</info{k}>" for k, f in enumerate(facts, 1))
        out_dir = tmp_path / "geo"
        summary = annotate.main(["all", "--input", str(src), "--limit", "6", "--image-field", "image",
                                 "--output-dir", str(out_dir), "--distil-base-urls", srv.base_url,
                                 "--extract-base-urls", srv.base_url, "--distil-model", "fake-vlm",
                                 "--extract-model", "fake-llm", "--max-pixels", str(3136 * 16),
                                 "--max-retries", "0"])
    assert len(kept) == 5 and str(rows[2]["id"]) not in kept and "15" in kept
    assert summary["filter/kept"] == len(kept) and summary["filter/total"] == 6 and summary["errors"] == 0
    assert summary["filter/gold_unparsable"] == 0 and summary["filter/gold_read_differently"] == 1
    # --gold-parse official reads "5 \\sqrt { 3 }" as 3: the right solution is dropped (official behaviour)
    official = tmp_path / "official"
    official.mkdir()
    (official / "distil.jsonl").write_text((out_dir / "distil.jsonl").read_text())
    off = annotate.main(["filter", "--output-dir", str(official), "--gold-parse", "official"])
    dropped = {r["key"] for r in data.read_jsonl(official / "filter.jsonl") if not r["kept"]}
    assert off["filter/kept"] == 4 and "15" in dropped and off["filter/gold_unparsable"] == 1
    out = check_export(out_dir, kept)
    assert all(r["problem"].startswith("<image>") for r in out)
    assert summary["distil/prompt_tokens"] > 0  # the server's usage counts were picked up
    assert json.loads((out_dir / "summary.json").read_text())["export/rows"] == len(kept)


def test_distil_resume_after_sigkill(demo_dir, tmp_path):
    """SIGKILL a distil run mid-way (slow server), add a torn last line, resume: every row exactly once."""
    n = 10
    inp = demo_dir / "train.jsonl"
    rows = data.read_jsonl(inp)[:n]
    out_dir = tmp_path / "out"
    with FakeServer(delay_s=0.4) as srv:
        args = args_for(srv, input=str(inp), limit=n, output_dir=str(out_dir), max_concurrency=2)
        for r in rows:
            srv.distil[sha_of_row_image(demo_dir / r["images"][0], args)] = [r["solution"]]
        cmd = [sys.executable, str(ROOT / "annotate.py"), "distil", "--input", str(inp), "--limit", str(n),
               "--output-dir", str(out_dir), "--distil-base-urls", srv.base_url, "--distil-model", "fake-vlm",
               "--max-concurrency", "2", "--chunk-rows", "4", "--max-pixels", str(3136 * 16)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = out_dir / "distil.jsonl"
        deadline = time.time() + 60
        try:
            while time.time() < deadline and proc.poll() is None:
                if path.exists() and len(path.read_text().splitlines()) >= 3:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the run finished before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(10)
        written = data.read_jsonl(path)
        assert 3 <= len(written) < n
        with open(path, "a") as fh:  # a write torn by the kill
            fh.write('{"key": "demo-train-00009", "status": "o')
        srv.delay_s = 0.0
        annotate.run_distil(args)
    recs = data.read_jsonl(path)
    keys = [r["key"] for r in recs]
    assert sorted(keys) == sorted(r["id"] for r in rows)  # no duplicate, no missing row
    assert all(r["status"] == "ok" and r["solutions"] == [next(x["solution"] for x in rows if x["id"] == r["key"])]
               for r in recs)


def test_failed_requests_are_retried_on_resume(demo_dir, tmp_path):
    """A server error becomes a retryable error record; a re-run with a working server fixes it."""
    inp = demo_dir / "train.jsonl"
    rows = data.read_jsonl(inp)[:3]
    with FakeServer() as srv:
        args = args_for(srv, input=str(inp), limit=3, output_dir=str(tmp_path))
        summary = annotate.run_distil(args)  # no scripts yet: every request gets HTTP 400
        assert summary["distil/errors"] == 3 and summary["distil/ok"] == 0
        assert all(r["retryable"] and "400" in r["error"] for r in data.read_jsonl(annotate.stage_path(args, "distil")))
        for r in rows:
            srv.distil[sha_of_row_image(demo_dir / r["images"][0], args)] = [r["solution"]]
        summary = annotate.run_distil(args)
    assert summary["distil/ok"] == 3 and summary["distil/errors"] == 0


@pytest.mark.slow(seconds=32)
def test_wire_format_against_vllm_server(vllm_server, demo_dir, tmp_path, monkeypatch):
    """Real `vllm serve` (tiny random model): image data URLs are accepted, garbage replies end as
    filtered-out problems or error records, never as a crash."""
    monkeypatch.setenv("TINY_KEY", vllm_server["api_key"])
    common = dict(input=str(demo_dir / "train.jsonl"), limit=2, output_dir=str(tmp_path),
                  distil_base_urls=(vllm_server["base_url"],), distil_model=vllm_server["model"],
                  distil_api_key_env="TINY_KEY", extract_base_urls=(vllm_server["base_url"],),
                  extract_model=vllm_server["model"], extract_api_key_env="TINY_KEY",
                  distil_max_tokens=8, extract_max_tokens=8, min_pixels=3136, max_pixels=3136 * 4,
                  max_retries=0, timeout_s=120)
    args = annotate.Args(**common)
    summary = annotate.run("all", args)
    assert summary["distil/ok"] == 2, annotate.error_summary(args)  # the server took the images
    assert summary["distil/request_failures"] == 0
    # garbage never has the right boxed answer; force the extract stage by marking both kept
    with data.open_for_append(annotate.stage_path(args, "filter")) as fh:
        for r in data.read_jsonl(annotate.stage_path(args, "distil")):
            data.append_jsonl(fh, {**{k: r[k] for k in ("key", "index", "id", "problem", "answer", "images",
                                                         "distil_model", "distil_at")},
                                   "status": "ok", "kept": True, "scores": [1.0], "solution": r["solutions"][0],
                                   "filter_at": annotate.now()})
    summary = annotate.run("extract", args)
    assert summary["extract/request_failures"] == 0
    assert summary["extract/ok"] + summary["extract/errors"] == 2
    data.load_rows(str(tmp_path / "train.parquet"))  # exported, possibly empty
