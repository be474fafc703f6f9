"""Tests of judge.py: parser, lexical backend, async client against a fault-injecting server,
the real `vllm serve` wire format, the offline vLLM backend, dedup, guard, CLI and benchmark.

The fault server (aiohttp, 127.0.0.1 only, in a daemon thread) decides how to misbehave from a
`MODE:<name>` marker inside the judged response, so one batch exercises every fault at once.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import FakeOpenAI  # noqa: E402
from judge import (ChatClient, ChatHTTPError, JudgeArgs, JudgeError, Reply, build_judge,  # noqa: E402
                   build_judge_messages, has_annotations, lexical_verdicts, main,
                   parse_judgement, split_annotations, visual_reward)

FACTS3 = "<info1>AB = 5</info1>\n<info2>BC = 8</info2>\n<info3>B lies on segment AC</info3>"


# =============================================================================================
# Parsing
# =============================================================================================
@pytest.mark.parametrize("text,n,expected", [
    ("<info1>1</info1><info2>0</info2><info3>1</info3>", 3, [1.0, 0.0, 1.0]),
    ("<info1> 1 </info1>\n<info2>0.0</info2>", 2, [1.0, 0.0]),
    ("<info1>1</info1><info3>1</info3>", 3, [1.0, None, 1.0]),           # missing K=2: later tags still read
    ("<info1>1</info1><info1>0</info1><info2>1</info2>", 2, [None, 1.0]),  # conflicting duplicate
    ("<info1>1</info1><info1>1</info1>", 1, [1.0]),                       # consistent duplicate
    ("<info1>1</info1><info2>1</info2><info7>0</info7><info0>1</info0>", 2, [1.0, 1.0]),  # extra tags ignored
    ("<info1>yes</info1><info2></info2><info3>nan</info3>", 3, [None, None, None]),  # non-numeric
    ("<info1>2</info1><info2>-1</info2><info3>0.5</info3>", 3, [None, None, 0.5]),   # out of range
    ("<info1>1</info2><info2>1", 2, [None, None]),                        # mismatched/unclosed tags
    ("I cannot decide.", 2, [None, None]),
    ("", 2, [None, None]),
    (None, 2, [None, None]),
    ("<info1>1</info1>", 0, []),
    ("\x00<info1>\n1\n</info1>", 1, [1.0]),
])
def test_parse_judgement(text, n, expected):
    assert parse_judgement(text, n) == expected


@pytest.mark.parametrize("text,expected", [
    (FACTS3, ["AB = 5", "BC = 8", "B lies on segment AC"]),
    ("<info2>second</info2>\n<info1>first</info1>", ["first", "second"]),  # ordered by K
    ("<info1>a</info1><info1>b</info1><info2>c</info2>", ["a", "c"]),     # repeated K keeps first
    ("<info1>  </info1><info2>x</info2>", ["x"]),                          # empty fact dropped
    ("<info1>multi\nline</info1>", ["multi\nline"]),
    ("fact one\n\nfact two\n", ["fact one", "fact two"]),                   # untagged: one per line
    ("", []), ("   \n", []), (None, []),
])
def test_split_annotations(text, expected):
    assert split_annotations(text) == expected


def test_visual_reward_and_flags():
    assert visual_reward([1.0, 0.0, 1.0, 1.0]) == 0.75
    assert visual_reward([1.0, None]) is None                     # default: every fact needs a verdict
    assert visual_reward([1.0, None], min_usable_fraction=0.5) == 1.0
    assert visual_reward([None, None], min_usable_fraction=0.0) is None  # nothing usable is always a failure
    assert visual_reward([]) == 0.0                               # no facts: official 0 ...
    assert not has_annotations("") and has_annotations(FACTS3)    # ... flagged for the logged mean


def test_prompt_puts_facts_before_response():
    a = build_judge_messages(["AB = 5", "BC = 8"], "response one")
    b = build_judge_messages(["AB = 5", "BC = 8"], "a different response")
    assert a[0] == b[0] and a[0]["role"] == "system"
    ua, ub = a[1]["content"], b[1]["content"]
    prefix = ua[:ua.index("response one")]
    assert ub.startswith(prefix) and "<info2>BC = 8</info2>" in prefix  # shared, cacheable prefix


# =============================================================================================
# Lexical backend on the demo data
# =============================================================================================
def test_lexical_backend_on_demo_data(demo_dir):
    from data import read_jsonl

    rows = read_jsonl(demo_dir / "train.jsonl") + read_jsonl(demo_dir / "test.jsonl")
    judge = build_judge(JudgeArgs(backend="lexical"))
    facts = [r["visual_key_info"] for r in rows]
    assert judge.score(facts, [r["solution"] for r in rows]) == [1.0] * len(rows)
    blank = judge.score(facts, ["<think>\nI do not know.\n</think>\n<answer>\n\\boxed{0}\n</answer>"] * len(rows))
    assert sum(blank) / len(blank) <= 0.05
    assert lexical_verdicts(["m∠A = 38°", "AB = 5"], "angle A is 38 degrees; m∠A = 38") == [1.0, 0.0]
    s = judge.stats()
    assert s["judge/failures"] == 0 and s["judge/responses"] == 2 * len(rows)


# =============================================================================================
# Fault-injecting OpenAI-compatible server (conftest.FakeOpenAI with a misbehaving reply)
# =============================================================================================
def _mode(body: dict) -> str:
    user = body["messages"][-1]["content"]
    m = re.search(r"MODE:(\w+)", user if isinstance(user, str) else json.dumps(user))
    return m.group(1) if m else "ok"


async def fault_reply(body, request):
    """Misbehave as the `MODE:<name>` marker in the judged response says; "_once" modes misbehave
    on the first request for a message only. Otherwise answer 1 for every fact."""
    from aiohttp import web

    user = body["messages"][-1]["content"]
    user = user if isinstance(user, str) else json.dumps(user)
    mode = _mode(body)
    first = sum(r["messages"][-1]["content"] == body["messages"][-1]["content"] for r in SERVER.requests) == 1
    k = len(set(re.findall(r"<info(\d+)>", user.split("Solution:")[0])))
    tags = "".join(f"<info{i}>1</info{i}>" for i in range(1, k + 1))
    if mode == "slow" or (mode == "slow_once" and first):
        await asyncio.sleep(1.5)  # beyond the client's 0.5 s timeout
    elif mode == "pause":
        await asyncio.sleep(0.3)  # within the timeout: requests overlap
    elif mode == "e500" or (mode == "e500_once" and first):
        return 500, "boom"
    elif mode == "e429" and first:
        return 429, "slow down", {"Retry-After": "1"}
    elif mode == "e400":
        return 400, "bad request"
    elif mode == "drop" or (mode == "drop_once" and first):
        request.transport.close()  # the client sees the connection vanish mid-request
        await asyncio.sleep(0.05)
        return web.Response(status=200)
    elif mode == "badjson":
        return web.Response(status=200, text='{"choices": [', content_type="application/json")
    elif mode == "notags":
        tags = "The solution looks fine to me."
    elif mode == "fewtags":
        tags = "<info1>1</info1>"
    elif mode == "extratags":
        tags += "<info9>1</info9>"
    elif mode == "zero":
        tags = tags.replace(">1<", ">0<")
    return tags


SERVER: FakeOpenAI = None  # the module's server (fault_reply reads its request log)


@pytest.fixture(scope="module")
def fault_server():
    global SERVER
    with FakeOpenAI(fault_reply) as SERVER:
        yield SERVER


def by_mode(server) -> collections.Counter:
    return collections.Counter(_mode(r) for r in server.requests)


def fast_args(server, **kw) -> JudgeArgs:
    base = dict(backend="openai", base_urls=(server.urls[0],), model="fake", api_key_env="TEST_FAKE_JUDGE_KEY",
                timeout_s=0.5, max_retries=2, backoff_base_s=0.05, backoff_max_s=2.0, max_failure_rate=1.0)
    return JudgeArgs(**{**base, **kw})


def test_faults_end_in_verdict_or_counted_failure(fault_server, monkeypatch):
    monkeypatch.setenv("TEST_FAKE_JUDGE_KEY", "sekret-123")
    fault_server.requests.clear()
    judge = build_judge(fast_args(fault_server))
    expect = {  # mode -> (reward, requests the server saw)
        "ok": (1.0, 1), "zero": (0.0, 1), "extratags": (1.0, 1),
        "slow_once": (1.0, 2), "e500_once": (1.0, 2), "e429": (1.0, 2), "drop_once": (1.0, 2),
        "slow": (None, 3), "e500": (None, 3), "drop": (None, 3),           # retried, then failed
        "e400": (None, 1), "badjson": (None, 1),                           # not retried
        "notags": (None, 1), "fewtags": (None, 1),                         # too few usable verdicts
    }
    modes = list(expect)
    rewards = judge.score([FACTS3] * len(modes), [f"Answer. MODE:{m}" for m in modes])
    assert len(rewards) == len(modes)
    seen = by_mode(fault_server)
    for m, r in zip(modes, rewards):
        assert r == expect[m][0], m
        assert seen[m] == expect[m][1], m
    s = judge.stats()
    n_fail = sum(r is None for r in rewards)
    assert s["judge/failures"] == n_fail and s["judge/failure_rate"] == pytest.approx(n_fail / len(modes))
    assert s["judge/request_failures"] == 5 and s["judge/parse_failures"] == 2
    assert s["judge/requests"] == len(modes)
    assert s["judge/retries"] == sum(v[1] - 1 for v in expect.values())
    assert s["judge/timeouts"] == 4 and s["judge/latency_mean_s"] > 0  # slow_once: 1, slow: 3
    assert s["judge/completion_tokens"] > 0  # the server's usage counts
    assert {r["_auth"] for r in fault_server.requests} == {"Bearer sekret-123"}  # key from the named env var


def test_retry_delay_backs_off_and_honours_retry_after():
    client = ChatClient(["http://127.0.0.1:9/v1"], "m", backoff_base_s=0.1, backoff_max_s=5.0)
    for attempt in range(4):  # base * 2^attempt times a jitter in [0.5, 1.5)
        d = client._retry_delay(attempt, RuntimeError())
        assert 0.05 * 2 ** attempt <= d < 0.15 * 2 ** attempt
    assert client._retry_delay(0, ChatHTTPError("u", 429, "", "2")) >= 2.0  # the server's Retry-After
    assert client._retry_delay(0, ChatHTTPError("u", 429, "", "600")) <= 5.0  # capped at backoff_max_s
    assert client._retry_delay(0, ChatHTTPError("u", 429, "", "Wed, 21 Oct 2015 07:28:00 GMT")) < 0.15


def test_health_check_names_the_url(fault_server):
    dead = "http://127.0.0.1:9/v1"
    with pytest.raises(JudgeError, match=re.escape(dead)):
        build_judge(fast_args(fault_server, base_urls=(fault_server.urls[0], dead)))
    with pytest.raises(JudgeError, match="does not serve model 'other'"):
        build_judge(fast_args(fault_server, model="other"))
    build_judge(fast_args(fault_server, base_urls=(dead,), health_check=False))  # off: no request at all


def test_guard_raises_when_failures_persist(fault_server):
    judge = build_judge(fast_args(fault_server, max_failure_rate=0.5, guard_min_responses=4, failure_window=8))
    assert judge.score([FACTS3] * 3, [f"fine {i}" for i in range(3)]) == [1.0] * 3  # window too small yet
    with pytest.raises(JudgeError, match="failure rate"):
        judge.score([FACTS3] * 6, [f"MODE:e400 {i}" for i in range(6)])
    assert judge.stats()["judge/failures"] == 6


def test_dedup_and_no_annotation_rows(fault_server):
    fault_server.requests.clear()
    judge = build_judge(fast_args(fault_server))
    resp = ["MODE:ok A"] * 4 + ["MODE:ok B"] * 3 + ["MODE:ok A"]
    facts = [FACTS3] * 7 + ["<info1>AB = 5</info1>"]  # same response, other facts: its own request
    assert judge.score(facts + [""], resp + ["MODE:ok none"]) == [1.0] * 8 + [0.0]
    assert by_mode(fault_server)["ok"] == 3
    s = judge.stats()
    assert s["judge/requests"] == 3 and s["judge/dedup_saved"] == 5 and s["judge/no_annotation_rows"] == 1


def test_several_urls_bounded_concurrency_and_worker_threads(fault_server):
    fault_server.requests.clear()
    judge = build_judge(fast_args(fault_server, base_urls=tuple(fault_server.urls), max_concurrency=4))
    with ThreadPoolExecutor(2) as pool:  # train_grpo calls score from a worker thread
        futs = [pool.submit(judge.score, [FACTS3] * 20, [f"MODE:ok t{t} r{i}" for i in range(20)]) for t in range(2)]
        assert all(f.result() == [1.0] * 20 for f in futs)
    ports = collections.Counter(r["_port"] for r in fault_server.requests)
    assert sorted(ports) == sorted(fault_server.ports) and min(ports.values()) >= 10  # URLs in turn

    async def from_a_running_loop():  # e.g. a notebook cell
        return judge.score([FACTS3], ["MODE:ok inside a loop"])

    assert asyncio.run(from_a_running_loop()) == [1.0]


def test_concurrency_is_bounded(fault_server):
    deadline = time.time() + 10
    while fault_server.in_flight and time.time() < deadline:  # earlier timed-out "slow" handlers
        time.sleep(0.05)
    fault_server.max_in_flight = 0
    client = ChatClient(fault_server.urls, "fake", max_concurrency=3, timeout_s=5)
    out = client.run_batch([[{"role": "user", "content": f"MODE:pause {i}"}] for i in range(9)])
    assert all(isinstance(r, Reply) for r in out) and fault_server.max_in_flight == 3


def test_chat_client_returns_text_usage_and_errors(fault_server):
    client = ChatClient(fault_server.urls, "fake", max_retries=0, timeout_s=5)
    image = [{"type": "text", "text": "What is shown?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    out = client.run_batch([[{"role": "user", "content": image}],
                            [{"role": "user", "content": "MODE:e400"}]], temperature=0.0)
    assert isinstance(out[0], Reply) and out[0].prompt_tokens == 10
    assert out[0].completion_tokens == len(out[0].text.split())  # the server's usage, passed on
    assert isinstance(out[1], ChatHTTPError) and out[1].status_code == 400
    assert client.stats()["request_failures"] == 1 and client.stats()["retries"] == 0
    assert client.run_batch([]) == []


# =============================================================================================
# Real `vllm serve` (tiny model: verdicts are garbage; the wire format and accounting are not)
# =============================================================================================
@pytest.mark.slow
def test_wire_format_against_vllm_server(vllm_server, monkeypatch):
    monkeypatch.setenv("TEST_VLLM_JUDGE_KEY", vllm_server["api_key"])
    args = JudgeArgs(base_urls=(vllm_server["base_url"],), model=vllm_server["model"], api_key_env="TEST_VLLM_JUDGE_KEY",
                     max_tokens=16, timeout_s=60, max_retries=1, backoff_base_s=0.1, max_failure_rate=1.0)
    judge = build_judge(args)  # health check passes with the right key
    responses = ["AB is 5 and BC is 8.", "I see nothing.", "AB is 5 and BC is 8.", "B lies on AC."]
    rewards = judge.score([FACTS3] * 4, responses)
    assert len(rewards) == 4
    assert all(r is None or (isinstance(r, float) and 0.0 <= r <= 1.0) for r in rewards)
    s = judge.stats()
    assert s["judge/requests"] == 3 and s["judge/dedup_saved"] == 1
    assert s["judge/request_failures"] == 0  # transport and JSON worked
    assert s["judge/failures"] == sum(r is None for r in rewards)  # every None is counted
    monkeypatch.setenv("TEST_VLLM_JUDGE_KEY", "wrong-key")
    with pytest.raises(JudgeError, match=re.escape(vllm_server["base_url"])):
        build_judge(args)


@pytest.mark.slow
def test_offline_vllm_backend(tiny_model_dir):
    judge = build_judge(JudgeArgs(backend="vllm", model=str(tiny_model_dir), vllm_dtype="float32",
                                  vllm_enforce_eager=True, vllm_max_model_len=2048, max_tokens=8,
                                  max_failure_rate=1.0))
    try:
        rewards = judge.score([FACTS3, FACTS3, ""], ["AB = 5", "AB = 5", "x"])
        assert rewards[2] == 0.0 and rewards[0] == rewards[1]
        assert all(r is None or 0.0 <= r <= 1.0 for r in rewards)
        s = judge.stats()
        assert s["judge/requests"] == 1 and s["judge/failures"] == sum(r is None for r in rewards[:2])
    finally:
        judge.close()


# =============================================================================================
# CLI and benchmark
# =============================================================================================
def test_cli_judges_and_resumes(tmp_path):
    from data import read_jsonl, write_jsonl

    rows = [{"visual_key_info": FACTS3, "response": "AB = 5, BC = 8 and B lies on segment AC."},
            {"visual_key_info": FACTS3, "response": "AB = 5."},
            {"visual_key_info": "", "response": "anything"},
            {"visual_key_info": "<info1>m∠A = 38°</info1>", "response": "m∠A = 38°"},
            {"visual_key_info": FACTS3, "response": "nothing"}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, rows)
    argv = ["run", "--input", str(inp), "--output", str(out), "--judge.backend", "lexical", "--chunk-size", "2"]
    main(argv)
    got = read_jsonl(out)
    assert [r["index"] for r in got] == [0, 1, 2, 3, 4]
    assert [r["judge_reward"] for r in got] == [1.0, pytest.approx(1 / 3), 0.0, 1.0, 0.0]
    assert got[1]["judge_verdicts"] == [1.0, 0.0, 0.0]
    main(argv)  # second run: nothing to do
    assert len(read_jsonl(out)) == 5
    text = out.read_text().splitlines(keepends=True)  # simulate a kill: 2 rows + half a row
    out.write_text("".join(text[:2]) + text[2][:10])
    main(argv)
    got = read_jsonl(out)
    assert sorted(r["index"] for r in got) == [0, 1, 2, 3, 4]


def test_cli_calibrate(tmp_path):
    from data import write_jsonl

    rows = [{"visual_key_info": FACTS3, "response": "AB = 5 and BC = 8.", "labels": [1, 1, 0]},
            {"visual_key_info": "<info1>m∠A = 38°</info1>\n<info2>AB = AC</info2>",
             "response": "Angle A is 38. AB = AC.", "labels": [1, 1]}]
    inp = tmp_path / "labelled.jsonl"
    write_jsonl(inp, rows)
    m = main(["calibrate", "--input", str(inp), "--judge.backend", "lexical"])
    # lexical misses "m∠A = 38°" (no "m" token in the response): 4 of 5 right, recall 3/4
    assert m["calibrate/facts"] == 5 and m["calibrate/coverage"] == 1.0
    assert m["calibrate/accuracy"] == pytest.approx(0.8)
    assert m["calibrate/precision"] == 1.0 and m["calibrate/recall"] == pytest.approx(0.75)
    assert m["calibrate/shuffle_consistency"] == 1.0  # lexical ignores order
    write_jsonl(inp, [{**rows[0], "labels": [1]}])
    with pytest.raises(ValueError, match="row 0: field 'labels'"):
        main(["calibrate", "--input", str(inp), "--judge.backend", "lexical"])



def test_benchmark_quick():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_judge

    """The benchmark runs at toy size and its request accounting holds (its time ratio is the
    benchmark's business, measured in benchmarks/RESULTS.md, not asserted here)."""
    out = bench_judge.run(bench_judge.Args(n=48, concurrency=16, latency_s=0.2, dup=3))
    assert out["failures"] == 0 and out["dedup_extra_requests"] == 0 and out["dedup_requests_ratio"] == 1.0
    assert out["time_ratio"] > 0.99  # 48 requests at 16 at a time cannot beat 3 x 0.2 s
