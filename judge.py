"""The judging LLM of Perception-R1: is each visual fact stated in a response? -> r_v.

What this file does
    Training rows carry `visual_key_info`, the atomic visual facts a correct solution needs,
    stored as "<info1>fact</info1>\\n<info2>fact</info2>...". For every sampled response a
    text-only judging LLM reads the facts and the response and answers, per fact, whether the
    response clearly states it (presence, not correctness): one `<infoK>1|0</infoK>` tag per
    fact. The visual perception reward is the mean of those verdicts (Perception-R1, arXiv
    2506.07218, method section "visual perception reward").
    This file owns the rubric prompt, the parser, an async client for any OpenAI-compatible
    server (`vllm serve`), an in-process vLLM backend, a cheap deterministic backend, and a CLI
    to judge or calibrate on a JSONL file. train_grpo.py imports `JudgeArgs`, `build_judge`.

Papers
    Perception-R1 (Xiao et al., arXiv 2506.07218) - the visual perception reward r_v.
    GRPO (Shao et al., arXiv 2402.03300) - the RL algorithm that consumes r_v.

Code map (section -> paper -> function)
    1. rubric prompt          -> sec. 1 "Judging LLM" (facts, presence rubric, 3 examples)
                                 -> RUBRIC, build_judge_messages
    2. parsing                -> r_v = mean_k v_k over usable verdicts
                                 -> split_annotations, parse_judgement, visual_reward
    3. chat client            -> OpenAI API, temperature 0, max 512 new tokens
                                 -> ChatClient (async, retries, load balancing), JudgeError,
                                    ChatHTTPError, MalformedReply
    4. backends               -> Judge (openai), VLLMJudge (offline), LexicalJudge (no LLM),
                                 build_judge, lexical_verdicts
    5. CLI                    -> run_file (judge a JSONL file, resumable), calibrate

Deviations from the paper / official code
    1. Parsing (official: reads <info1>, <info2>, ... and stops at the first missing K; a
       non-numeric value counts 0; values are clamped to [0, 1]; r_v = sum / (count + 1e-6)).
       Here every K in 1..m is looked up independently, so one missing tag does not hide the
       ones after it; a missing, non-numeric, out-of-range (outside [0, 1]) or conflicting
       (same K twice with different values) tag gives None (no usable verdict) instead of 0;
       tags with K > m are ignored. r_v is the plain mean over usable verdicts (no 1e-6).
    2. A response whose usable verdicts cover less than `min_usable_fraction` of its facts
       (default 1.0: every fact needs a verdict) is a judge FAILURE (None), not a low reward.
       Failed requests are also None (in the official code a failed request returns None, which
       the next line dereferences: the run crashes). Failures are counted (`judge/failure_rate`)
       and a run-level guard raises JudgeError when they persist.
    3. A row with no facts gets r_v = 0 as in the official code; `has_annotations` lets the
       trainer leave it out of the logged mean (`judge/no_annotation_rows` counts them).
    4. Identical (facts, response) pairs in one batch are judged once (same verdict at
       temperature 0; saves requests when a group repeats a response).
    5. The rubric and its three worked examples are our own words, not the official prompt.
    6. `lexical` backend (no LLM, deterministic) is ours: a cheap baseline for the CPU demo.
    7. Ours too: timeouts, retries with backoff, several judge servers load-balanced, and a
       start-up health check (the official client has none of these).

Launch
    # judge a file with the deterministic baseline (CPU, no server)
    python judge.py run --input rollouts.jsonl --output judged.jsonl --judge.backend lexical
    # against a judge server (GPU box: `vllm serve Qwen/Qwen2.5-32B-Instruct-AWQ --enable-prefix-caching`)
    JUDGE_API_KEY=... python judge.py run --input rollouts.jsonl --output judged.jsonl \\
        --judge.base-urls http://judge1:8000/v1 http://judge2:8000/v1 \\
        --judge.model Qwen/Qwen2.5-32B-Instruct-AWQ
    # offline engine in this process (on CPU add: --judge.vllm-dtype float32 --judge.vllm-enforce-eager)
    python judge.py run --input rollouts.jsonl --output judged.jsonl --judge.backend vllm --judge.model MODEL_DIR
    # how good is the judge? (rows with visual_key_info, response, labels=[1,0,...])
    python judge.py calibrate --input labelled.jsonl --judge.backend lexical
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import tyro

# =============================================================================================
# Args
# =============================================================================================
BACKENDS = ("openai", "vllm", "lexical")


@dataclasses.dataclass
class JudgeArgs:
    backend: str = "openai"
    """which judge: "openai" (any OpenAI-compatible server, e.g. `vllm serve`; the paper's setup),
    "vllm" (in-process offline vLLM engine on `model`), or "lexical" (no LLM; a fact counts present
    when all its number/word tokens occur in the response; cheap deterministic baseline for the CPU demo)"""
    base_urls: tuple[str, ...] = ("http://127.0.0.1:8000/v1",)
    """openai backend: server base URLs ending in /v1; several are load-balanced (least busy first,
    ties round-robin). Paper: 8 GPUs serve the judge"""
    model: str = "Qwen/Qwen2.5-32B-Instruct-AWQ"
    """judge model: served model name (openai) or hub id / local folder (vllm). Paper: Qwen2.5-32B-Instruct-AWQ"""
    api_key_env: str = "JUDGE_API_KEY"
    """NAME of the environment variable holding the API key (the key itself is never logged);
    unset -> the placeholder key "EMPTY" (what `vllm serve` without --api-key accepts)"""
    max_concurrency: int = 64
    """requests in flight at once over all base URLs (ours; size it to the judge servers)"""
    timeout_s: float = 120.0
    """seconds per request attempt before it counts as timed out (ours)"""
    max_retries: int = 4
    """retries after the first attempt, only on connection errors, timeouts, 5xx and 429 (ours)"""
    backoff_base_s: float = 1.0
    """first retry waits about this long (seconds), doubling each retry, times a random jitter in [0.5, 1.5) (ours)"""
    backoff_max_s: float = 30.0
    """cap on one retry wait in seconds, also caps a server's Retry-After (ours)"""
    temperature: float = 0.0
    """judge sampling temperature (paper: 0)"""
    max_tokens: int = 512
    """max new tokens of a judgement (paper: 512)"""
    min_usable_fraction: float = 1.0
    """a response whose usable verdicts cover less than this fraction of its facts is a judge
    failure (None), not a low reward. 1.0 = every fact needs a verdict (ours; official: none)"""
    max_failure_rate: float = 0.5
    """run-level guard: raise JudgeError when the failure rate over the last `failure_window`
    responses exceeds this (ours; 1.0 disables the guard)"""
    failure_window: int = 512
    """number of most recent judged responses the guard looks at (ours)"""
    guard_min_responses: int = 32
    """the guard waits until the window holds at least this many responses (ours)"""
    health_check: bool = True
    """check at start-up that every server answers and serves `model`; fail fast naming the URL"""
    vllm_dtype: str = "auto"
    """vllm backend: weight dtype ("float32" on CPU)"""
    vllm_enforce_eager: bool = False
    """vllm backend: no CUDA graphs (True on CPU)"""
    vllm_max_model_len: int = 8192
    """vllm backend: context length in tokens (facts + response + judgement)"""
    vllm_gpu_memory_utilization: float = 0.9
    """vllm backend: fraction of GPU memory for the engine (ignored on CPU)"""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"--judge.backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.base_urls, str):
            self.base_urls = (self.base_urls,)
        self.base_urls = tuple(u.rstrip("/") for u in self.base_urls)
        if self.backend == "openai" and not self.base_urls:
            raise ValueError("--judge.base-urls needs at least one URL for the openai backend")
        if not 0.0 <= self.min_usable_fraction <= 1.0:
            raise ValueError(f"min_usable_fraction must be in [0, 1], got {self.min_usable_fraction}")
        if self.max_concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError("max_concurrency >= 1, max_retries >= 0 and timeout_s > 0 are required")


class JudgeError(RuntimeError):
    """The judge cannot be trusted: unreachable at start-up, or failures persist during a run."""


class ChatHTTPError(RuntimeError):
    """A chat request answered with HTTP status >= 400 (429 and 5xx are retried, the rest not)."""

    def __init__(self, url: str, status_code: int, body: str, retry_after: str | None = None):
        super().__init__(f"{url}: HTTP {status_code}: {body}")
        self.url, self.status_code, self.retry_after = url, status_code, retry_after


class MalformedReply(RuntimeError):
    """A 200 reply that is not a chat completion with message text (not retried)."""


# =============================================================================================
# 1. Rubric prompt (facts and rubric first, response last -> G responses share a cached prefix)
# =============================================================================================
# Our own wording. The judge sees text only (never the image) and is asked about PRESENCE:
# a wrong fact that the response states still counts 1 - the facts are assumed true.
RUBRIC = """You check whether a student's solution mentions given facts about a diagram.

You receive a numbered list of facts, each inside <infoK>...</infoK> tags, and then a solution.
For every fact decide one thing: does the solution clearly state this fact, or state something
that plainly means the same (other wording, symbols or notation are fine)? Do not judge whether
the solution is correct, and do not reward facts that are only hinted at or that the solution
contradicts. The thinking part of the solution counts like the rest.

Answer with exactly one tag per fact, in order, and nothing else: <infoK>1</infoK> if fact K is
stated, <infoK>0</infoK> if it is not.

Example 1
Facts:
<info1>PQ = 7</info1>
<info2>R lies on segment PS</info2>
Solution: Since R is a point on PS and PQ measures 7, we get PS = 7 + 4 = 11.
Verdicts:
<info1>1</info1>
<info2>1</info2>

Example 2
Facts:
<info1>m∠XYZ = 35°</info1>
<info2>XY ∥ ZW</info2>
<info3>YZ = 12</info3>
Solution: The angle at Y is 35 degrees, so the answer is 145.
Verdicts:
<info1>1</info1>
<info2>0</info2>
<info3>0</info3>

Example 3
Facts:
<info1>triangle DEF is isosceles with DE = DF</info1>
Solution: DE is longer than DF, so angle F is the largest angle.
Verdicts:
<info1>0</info1>"""


def build_judge_messages(facts: Sequence[str], response: str) -> list[dict]:
    """Chat messages for one judgement: system = rubric, user = facts then the response.

    The facts come before the response so the G responses to one problem share the prompt
    prefix (rubric + facts) and the server's prefix cache serves it once.
    """
    user = (f"Facts:\n{format_facts(facts)}\n\nSolution:\n{response}\n\n"
            f"Give {len(facts)} verdict tag(s), <info1> to <info{len(facts)}>.")
    return [{"role": "system", "content": RUBRIC}, {"role": "user", "content": user}]


# =============================================================================================
# 2. Parsing: annotations in, verdicts out, r_v = mean of usable verdicts
# =============================================================================================
_INFO_TAG = re.compile(r"<info(\d+)>(.*?)</info\1>", re.DOTALL)


def format_facts(items: Sequence[Any]) -> str:
    """The tag format of facts and verdicts alike: "<info1>x</info1>\\n<info2>y</info2>..." (K = 1..m).

    >>> format_facts(["AB = 5", "BC = 8"])
    '<info1>AB = 5</info1>\\n<info2>BC = 8</info2>'
    """
    return "\n".join(f"<info{k}>{x}</info{k}>" for k, x in enumerate(items, 1))


def split_annotations(visual_key_info: str | None) -> list[str]:
    """The facts of a `visual_key_info` string, in order of their number K.

    >>> split_annotations("<info1>AB = 5</info1>\\n<info2> BC = 8 </info2>")
    ['AB = 5', 'BC = 8']

    Empty/None -> []. Empty facts are dropped. Text without any tag is one fact per non-empty
    line (hand-written files). Tags out of order are sorted by K; a repeated K keeps its first
    fact (later copies would shift every verdict index).
    """
    if not visual_key_info or not str(visual_key_info).strip():
        return []
    text = str(visual_key_info)
    tags = _INFO_TAG.findall(text)
    if not tags:
        return [line.strip() for line in text.splitlines() if line.strip()]
    by_k: dict[int, str] = {}
    for k, fact in tags:
        if int(k) not in by_k and fact.strip():
            by_k[int(k)] = fact.strip()
    return [by_k[k] for k in sorted(by_k)]


def parse_judgement(text: str | None, num_annotations: int) -> list[float | None]:
    """One verdict per fact K = 1..num_annotations from the judge's `<infoK>v</infoK>` tags.

    v must be a number in [0, 1] (e.g. "1", "0", "1.0", " 0 "); otherwise None (no usable
    verdict): tag missing, value non-numeric or out of range, or the same K given twice with
    different values. Tags with K outside 1..num_annotations are ignored. Never raises.

    >>> parse_judgement("<info1>1</info1><info2>yes</info2><info4>1</info4>", 3)
    [1.0, None, None]
    """
    if num_annotations <= 0:
        return []
    values: dict[int, set] = collections.defaultdict(set)
    for k, raw in _INFO_TAG.findall(text or ""):
        k = int(k)
        if not 1 <= k <= num_annotations:
            continue  # extra tag: no fact to attach it to
        try:
            v = float(raw.strip())
        except ValueError:
            v = None
        values[k].add(v if v is not None and math.isfinite(v) and 0.0 <= v <= 1.0 else None)
    out: list[float | None] = []
    for k in range(1, num_annotations + 1):
        vs = values.get(k, set())
        out.append(next(iter(vs)) if len(vs) == 1 else None)  # missing or conflicting -> None
    return out


def visual_reward(verdicts: Sequence[float | None], min_usable_fraction: float = 1.0) -> float | None:
    """r_v = mean of the usable verdicts; None (judge failure) when fewer than
    `min_usable_fraction` of the facts got a usable verdict. No facts -> 0.0 (official value;
    use `has_annotations` to leave such rows out of logged means).

    >>> visual_reward([1.0, 0.0, 1.0, 1.0])
    0.75
    >>> visual_reward([1.0, None], min_usable_fraction=1.0) is None
    True
    >>> visual_reward([1.0, None], min_usable_fraction=0.5)
    1.0
    """
    if len(verdicts) == 0:
        return 0.0
    usable = [v for v in verdicts if v is not None]
    if not usable or len(usable) < min_usable_fraction * len(verdicts) - 1e-9:
        return None
    return sum(usable) / len(usable)


def has_annotations(visual_key_info: str | None) -> bool:
    """False for rows whose r_v is the placeholder 0 (no facts): exclude them from logged means."""
    return len(split_annotations(visual_key_info)) > 0


# =============================================================================================
# 3. Chat client for OpenAI-compatible servers (the judge's; annotate.py and evaluate.py use it too)
# =============================================================================================
@dataclasses.dataclass
class Reply:
    """One chat completion: its text and the server's token counts (0 when it sends none)."""
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatClient:
    """Chat completions against one or more OpenAI-compatible servers (`vllm serve`, any API).

    - at most `max_concurrency` requests in flight over all servers; attempts take the URLs in turn;
    - an attempt times out after `timeout_s`; connection errors, timeouts, HTTP 5xx and 429 are
      retried with exponential backoff and jitter (a server's Retry-After is honoured); other 4xx
      and malformed replies are not;
    - `run_batch` returns a Reply or the Exception per request, in input order: one failed request
      never raises; `counts` and `latencies` record what happened (see `stats`).
    """

    def __init__(self, base_urls: Sequence[str], model: str, api_key_env: str = "JUDGE_API_KEY",
                 max_concurrency: int = 64, timeout_s: float = 120.0, max_retries: int = 4,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 30.0):
        self.base_urls = [base_urls] if isinstance(base_urls, str) else [u.rstrip("/") for u in base_urls]
        if not self.base_urls:
            raise ValueError("ChatClient needs at least one base URL")
        self.model, self.api_key_env, self.max_concurrency = model, api_key_env, max_concurrency
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.counts: collections.Counter = collections.Counter()
        self.latencies: collections.deque = collections.deque(maxlen=10_000)
        self._lock = threading.Lock()  # counters are shared by the threads that call run_batch
        self._turn = itertools.count()  # which URL the next attempt goes to

    def _api_key(self) -> str:
        return os.environ.get(self.api_key_env) or "EMPTY"  # never printed

    def run_batch(self, batch: list[list[dict]], on_done=None, **sampling: Any) -> list[Reply | Exception]:
        """Send every request (concurrently, bounded); return the Reply or the Exception of each.
        `on_done(index, result)` is called as each one finishes. Blocking; safe from any thread."""
        if not batch:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: no event loop in this thread
            return asyncio.run(self._run(batch, on_done, sampling))
        with ThreadPoolExecutor(1) as pool:  # called inside a running loop (a notebook): use a helper thread
            return pool.submit(asyncio.run, self._run(batch, on_done, sampling)).result()

    async def _run(self, batch, on_done, sampling) -> list[Reply | Exception]:
        import openai

        # max_retries=0: we retry ourselves, to count retries and apply the policy above
        clients = [openai.AsyncOpenAI(base_url=u, api_key=self._api_key(), timeout=self.timeout_s, max_retries=0)
                   for u in self.base_urls]
        limit = asyncio.Semaphore(self.max_concurrency)

        async def one(k: int, messages: list[dict]) -> Reply | Exception:
            async with limit:
                try:
                    out = await self._ask(clients, messages, sampling)
                except Exception as e:  # returned, not raised: the caller counts it as a failure
                    out = e
            if on_done is not None:
                on_done(k, out)
            return out

        try:
            return list(await asyncio.gather(*(one(k, m) for k, m in enumerate(batch))))
        finally:
            for client in clients:
                await client.close()

    async def _ask(self, clients, messages: list[dict], sampling: dict) -> Reply:
        """One request with its retries; raises the last error."""
        self._count(requests=1)
        start = time.perf_counter()  # latency: first attempt to answer, retries included
        for attempt in range(self.max_retries + 1):
            i = next(self._turn) % len(clients)
            self._count(attempts=1)
            try:
                # wait_for also bounds a server that trickles bytes slower than the read timeout
                r = await asyncio.wait_for(clients[i].chat.completions.create(
                    model=self.model, messages=messages, **sampling), timeout=self.timeout_s)
                reply = _as_reply(self.base_urls[i], r)
                with self._lock:
                    self.latencies.append(time.perf_counter() - start)
                self._count(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
                return reply
            except Exception as e:
                error = _classify(self.base_urls[i], e)
                self._count(timeouts=int(isinstance(error, TimeoutError)))
                if not _retryable(error) or attempt == self.max_retries:
                    self._count(failures=1)
                    raise error from e
                self._count(retries=1)
            await asyncio.sleep(self._retry_delay(attempt, error))
        raise AssertionError("unreachable")

    def _retry_delay(self, attempt: int, error: Exception) -> float:
        """Exponential backoff with jitter; a server's Retry-After (seconds) wins when longer."""
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt) * (0.5 + random.random())
        try:
            return max(delay, min(float(getattr(error, "retry_after", None) or 0), self.backoff_max_s))
        except ValueError:  # an HTTP date: keep the backoff
            return delay

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self.counts.update(amounts)

    def health_check(self, timeout_s: float = 10.0) -> None:
        """Fail fast (JudgeError naming the URL) unless every server answers and serves `model`."""
        import openai

        for url in self.base_urls:
            try:
                client = openai.OpenAI(base_url=url, api_key=self._api_key(), timeout=timeout_s, max_retries=0)
                served = [m.id for m in client.models.list()]
            except Exception as e:  # any transport, HTTP or JSON problem means "not usable"
                raise JudgeError(f"judge server {url} failed its health check "
                                 f"(GET {url}/models: {type(e).__name__}: {e})") from e
            if self.model not in served:
                raise JudgeError(f"judge server {url} does not serve model {self.model!r} (it serves {served})")

    def stats(self) -> dict[str, float]:
        with self._lock:
            c, lat = dict(self.counts), list(self.latencies)
        return {"requests": c.get("requests", 0), "attempts": c.get("attempts", 0), "retries": c.get("retries", 0),
                "request_failures": c.get("failures", 0), "timeouts": c.get("timeouts", 0),
                "prompt_tokens": c.get("prompt_tokens", 0), "completion_tokens": c.get("completion_tokens", 0),
                "latency_mean_s": sum(lat) / len(lat) if lat else 0.0, "latency_max_s": max(lat) if lat else 0.0}


def _as_reply(url: str, completion) -> Reply:
    """The text and token counts of a chat completion; MalformedReply when it has no message text."""
    try:
        text = completion.choices[0].message.content
    except (AttributeError, IndexError, TypeError) as e:
        raise MalformedReply(f"{url}: not a chat completion ({type(e).__name__}: {e})") from e
    if not isinstance(text, str):
        raise MalformedReply(f"{url}: chat completion without message text: {str(completion)[:200]!r}")
    usage = getattr(completion, "usage", None)
    return Reply(text, int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))


def _classify(url: str, error: Exception) -> Exception:
    """openai's errors in our terms: ChatHTTPError for HTTP statuses, TimeoutError for timeouts,
    MalformedReply for a 200 that is not a chat completion; connection errors stay as they are."""
    import openai

    if isinstance(error, openai.APIStatusError):
        return ChatHTTPError(url, error.status_code, error.response.text[:300], error.response.headers.get("retry-after"))
    if isinstance(error, (openai.APITimeoutError, asyncio.TimeoutError)):
        return TimeoutError(f"{url}: no answer within the timeout")
    if isinstance(error, (openai.APIConnectionError, MalformedReply)):
        return error
    return MalformedReply(f"{url}: malformed reply ({type(error).__name__}: {error})")


def _retryable(error: Exception) -> bool:
    import openai

    if isinstance(error, (openai.APIConnectionError, TimeoutError)):
        return True  # connection refused or dropped, timeouts
    return isinstance(error, ChatHTTPError) and (error.status_code == 429 or error.status_code >= 500)


def make_client(args: JudgeArgs) -> ChatClient:
    """The chat client of a judge configuration (the openai backend; evaluate.py's answer judge)."""
    return ChatClient(args.base_urls, args.model, args.api_key_env, args.max_concurrency, args.timeout_s,
                      args.max_retries, args.backoff_base_s, args.backoff_max_s)


# =============================================================================================
# 4. Backends behind one interface: Judge.score(annotations, responses) -> list[float | None]
# =============================================================================================
@dataclasses.dataclass
class Judgement:
    """Everything known about one judged response (the CLI writes these fields)."""
    reward: float | None  # r_v, or None = judge failure
    verdicts: list[float | None]  # one per fact
    raw: str | None  # the judge's text
    error: str | None  # why it failed, if it did
    num_facts: int


class Judge:
    """openai backend (the paper's setup); base class of the other backends.

    Subclasses override `_generate(pairs) -> list[str | Exception]` (judge texts in the tag
    format); parsing, dedup, failure accounting and the guard are shared.
    """

    def __init__(self, args: JudgeArgs):
        self.args = args
        self._lock = threading.Lock()
        self.counts = collections.Counter()
        self._window: collections.deque = collections.deque(maxlen=args.failure_window)
        self.client = make_client(args) if args.backend == "openai" else None

    # ---- backend hook
    def _generate(self, pairs: list[tuple[tuple[str, ...], str]]) -> list[str | Exception]:
        batch = [build_judge_messages(facts, response) for facts, response in pairs]
        replies = self.client.run_batch(batch, temperature=self.args.temperature, max_tokens=self.args.max_tokens)
        return [r.text if isinstance(r, Reply) else r for r in replies]

    # ---- shared logic
    def score_detailed(self, annotations: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        """Judge each (visual_key_info, response) pair; see `score`."""
        if len(annotations) != len(responses):
            raise ValueError(f"score: {len(annotations)} annotations but {len(responses)} responses")
        facts = [tuple(split_annotations(a)) for a in annotations]
        # ALGO: identical (facts, response) pairs get one request (temperature 0 -> same verdict)
        unique: dict[tuple, int] = {}
        for f, r in zip(facts, responses):
            if f:  # rows without facts need no judge
                unique.setdefault((f, r), len(unique))
        pairs = list(unique)
        texts = self._generate(pairs) if pairs else []
        results: list[Judgement] = []
        for f, r in zip(facts, responses):
            if not f:
                results.append(Judgement(0.0, [], None, None, 0))  # official: 0, flagged via has_annotations
                continue
            text = texts[unique[(f, r)]]
            if isinstance(text, Exception):
                results.append(Judgement(None, [None] * len(f), None, f"{type(text).__name__}: {text}"[:500], len(f)))
                continue
            verdicts = parse_judgement(text, len(f))
            reward = visual_reward(verdicts, self.args.min_usable_fraction)
            err = None if reward is not None else (
                f"only {sum(v is not None for v in verdicts)}/{len(f)} usable verdicts")
            results.append(Judgement(reward, verdicts, text, err, len(f)))
        self._account(results, len(facts) - len(pairs) - sum(1 for f in facts if not f), texts)
        return results

    def score(self, annotations: Sequence[str], responses: Sequence[str]) -> list[float | None]:
        """r_v per response (blocking; safe from a worker thread). `annotations` are raw
        visual_key_info strings, one per response. None = judge failure (request failed or too few
        usable verdicts) - never 0. Rows without facts get 0.0. Raises JudgeError when the
        failure rate over the recent window exceeds `max_failure_rate`."""
        return [j.reward for j in self.score_detailed(annotations, responses)]

    def _account(self, results: list[Judgement], dedup_saved: int, texts: list) -> None:
        with self._lock:
            c = self.counts
            c["responses"] += len(results)
            c["dedup_saved"] += dedup_saved
            c["no_annotation_rows"] += sum(j.num_facts == 0 for j in results)
            c["request_failures"] += sum(isinstance(t, Exception) for t in texts)
            c["parse_failures"] += sum(j.reward is None and j.raw is not None for j in results)
            judged = [j for j in results if j.num_facts > 0]
            c["judged"] += len(judged)
            c["failures"] += sum(j.reward is None for j in judged)
            self._window.extend(j.reward is None for j in judged)
            window = list(self._window)
        # PLUMBING: the run-level guard - a dead or broken judge must stop training, not zero r_v
        if len(window) >= min(self.args.guard_min_responses, self.args.failure_window):
            rate = sum(window) / len(window)
            if rate > self.args.max_failure_rate:
                example = next((j.error for j in results if j.reward is None and j.error), "n/a")
                raise JudgeError(f"judge failure rate {rate:.2f} over the last {len(window)} responses exceeds "
                                 f"max_failure_rate={self.args.max_failure_rate} (backend {self.args.backend}, "
                                 f"{self._where()}); last error: {example}")

    def _where(self) -> str:
        return f"URLs {', '.join(self.args.base_urls)}" if self.client else f"model {self.args.model}"

    def stats(self) -> dict[str, float]:
        """Counters since start, namespaced judge/... (see README glossary)."""
        with self._lock:
            c = dict(self.counts)
        out = {"responses": c.get("responses", 0), "judged": c.get("judged", 0),
               "failures": c.get("failures", 0),
               "failure_rate": c.get("failures", 0) / max(1, c.get("judged", 0)),
               "request_failures": c.get("request_failures", 0), "parse_failures": c.get("parse_failures", 0),
               "dedup_saved": c.get("dedup_saved", 0), "no_annotation_rows": c.get("no_annotation_rows", 0)}
        if self.client is not None:
            cs = self.client.stats()
            out.update({k: cs[k] for k in ("requests", "attempts", "retries", "timeouts", "prompt_tokens",
                                           "completion_tokens", "latency_mean_s", "latency_max_s")})
        else:
            out.update(requests=c.get("requests", 0))
        return {f"judge/{k}": float(v) for k, v in out.items()}

    def health_check(self) -> None:
        """Raise JudgeError (naming the URL) unless every judge server answers and serves the model."""
        if self.client is not None:
            self.client.health_check()

    def close(self) -> None:
        """Release resources (the HTTP clients are per batch, so nothing stays open)."""


class VLLMJudge(Judge):
    """In-process offline vLLM engine (`vllm.LLM`) running the judge model (prefix caching on)."""

    def __init__(self, args: JudgeArgs):
        super().__init__(args)
        from vllm import LLM, SamplingParams

        import data

        self.llm = LLM(model=args.model, dtype=args.vllm_dtype, enforce_eager=args.vllm_enforce_eager,
                       max_model_len=args.vllm_max_model_len, enable_prefix_caching=True,
                       gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                       **data.vllm_cpu_settings(args.model, args.vllm_max_model_len, args.max_concurrency))
        self.sampling = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
        self._engine_lock = threading.Lock()  # vllm.LLM is not re-entrant

    def _generate(self, pairs):
        batch = [build_judge_messages(f, r) for f, r in pairs]
        with self._lock:
            self.counts["requests"] += len(batch)
        try:
            with self._engine_lock:
                outs = self.llm.chat(batch, self.sampling, use_tqdm=False)
            return [o.outputs[0].text for o in outs]
        except Exception as e:  # one engine error fails the whole batch; counted, not hidden
            return [e] * len(batch)

    def close(self) -> None:
        del self.llm


_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+", re.UNICODE)


def lexical_tokens(text: str) -> set[str]:
    """Normalised tokens: numbers ("12", "3.5") and runs of letters (lower-cased), so symbols
    and spacing do not matter: "m∠A = 38°" -> {"m", "a", "38"}."""
    return {t.lower() for t in _TOKEN.findall(text)}


def lexical_verdicts(facts: Sequence[str], response: str) -> list[float]:
    """A fact is present (1.0) when every one of its tokens occurs in the response, else 0.0.
    Deterministic and crude: word order, negation and meaning are ignored."""
    have = lexical_tokens(response)
    return [1.0 if lexical_tokens(f) <= have else 0.0 for f in facts]


class LexicalJudge(Judge):
    """No LLM: see `lexical_verdicts`. Emits the judge's tag format so the same parser runs."""

    def _generate(self, pairs):
        with self._lock:
            self.counts["requests"] += len(pairs)
        return [format_facts(int(v) for v in lexical_verdicts(f, r)) for f, r in pairs]


def build_judge(args: JudgeArgs) -> Judge:
    """The judge `args.backend` asks for; the openai backend is health-checked first."""
    if args.backend == "lexical":
        return LexicalJudge(args)
    if args.backend == "vllm":
        return VLLMJudge(args)
    judge = Judge(args)
    if args.health_check:
        judge.health_check()
    return judge


# =============================================================================================
# 5. CLI: judge a JSONL file (resumable) or calibrate against labelled verdicts
# =============================================================================================
@dataclasses.dataclass
class RunArgs:
    """Judge every row of a JSONL file; append one output row per input row as results arrive."""
    input: str
    """JSONL file of rows with the facts and the response"""
    output: str
    """JSONL file to append to; rows already there (by `index`, the input row position, 0-based,
    blank lines skipped) are not judged again, so a killed run resumes. Rows that failed are written
    with judge_reward null and judge_error set; delete those lines to have them judged again"""
    judge: JudgeArgs = dataclasses.field(default_factory=JudgeArgs)
    """the judge (backend, servers, model, retries; see the judge.* options)"""
    facts_field: str = "visual_key_info"
    """input field holding the facts string "<info1>...</info1>..." """
    response_field: str = "response"
    """input field holding the response to judge"""
    chunk_size: int = 256
    """rows judged per batch; each finished batch is appended before the next starts"""


@dataclasses.dataclass
class CalibrateArgs:
    """Measure the judge against labelled per-fact verdicts, and its consistency under fact shuffles."""
    input: str
    """JSONL with the facts field, the response field and `labels_field` (a 0/1 list, one per fact)"""
    judge: JudgeArgs = dataclasses.field(default_factory=JudgeArgs)
    """the judge under test (see the judge.* options)"""
    facts_field: str = "visual_key_info"
    """input field holding the facts string"""
    response_field: str = "response"
    """input field holding the response"""
    labels_field: str = "labels"
    """input field holding the true verdicts (1 = the fact is stated)"""
    seed: int = 0
    """seed of the fact shuffle used for the consistency check"""


def _row_text(row: dict, field: str, where: str) -> str:
    if field not in row:
        raise KeyError(f"{where}: missing field '{field}'")
    return "" if row[field] is None else str(row[field])


def run_file(args: RunArgs) -> dict[str, float]:
    """Judge `args.input` into `args.output` (resumable). Returns the judge's stats."""
    from tqdm import tqdm

    from data import append_jsonl, open_for_append, read_jsonl

    rows = read_jsonl(args.input)
    done = {r.get("index") for r in read_jsonl(args.output)}
    todo = [i for i in range(len(rows)) if i not in done]
    judge = build_judge(args.judge)
    try:
        with open_for_append(args.output) as fh, tqdm(total=len(rows), initial=len(rows) - len(todo),
                                                       desc="judge", unit="row") as bar:
            for start in range(0, len(todo), args.chunk_size):
                idx = todo[start:start + args.chunk_size]
                facts = [_row_text(rows[i], args.facts_field, f"{args.input} row {i}") for i in idx]
                resps = [_row_text(rows[i], args.response_field, f"{args.input} row {i}") for i in idx]
                for i, j in zip(idx, judge.score_detailed(facts, resps)):
                    append_jsonl(fh, {"index": i, **rows[i], "judge_reward": j.reward, "judge_verdicts": j.verdicts,
                                      "judge_raw": j.raw, "judge_error": j.error})
                bar.update(len(idx))
                bar.set_postfix(failures=int(judge.stats()["judge/failures"]))
        stats = judge.stats()
    finally:
        judge.close()
    print(json.dumps(stats, indent=1))
    return stats


def calibrate(args: CalibrateArgs) -> dict[str, float]:
    """Accuracy and precision/recall of "present" against the labels (over facts with a usable
    verdict), coverage (fraction with a usable verdict), and consistency: the fraction of per-fact
    verdicts unchanged when the facts are shown in a shuffled order."""
    from data import read_jsonl

    rows = read_jsonl(args.input)
    rng = random.Random(args.seed)
    facts, resps, labels, perms = [], [], [], []
    for i, row in enumerate(rows):
        f = split_annotations(_row_text(row, args.facts_field, f"{args.input} row {i}"))
        lab = row.get(args.labels_field)
        if not isinstance(lab, list) or len(lab) != len(f):
            raise ValueError(f"{args.input} row {i}: field '{args.labels_field}' must be a list of "
                             f"{len(f)} 0/1 labels (one per fact), got {lab!r}")
        perm = list(range(len(f)))
        rng.shuffle(perm)
        facts.append(f)
        resps.append(_row_text(row, args.response_field, f"{args.input} row {i}"))
        labels.append([int(x) for x in lab])
        perms.append(perm)

    judge = build_judge(args.judge)
    try:
        first = judge.score_detailed([format_facts(f) for f in facts], resps)
        shuffled = judge.score_detailed([format_facts([f[p] for p in perm]) for f, perm in zip(facts, perms)], resps)
        stats = judge.stats()
    finally:
        judge.close()
    tp = fp = fn = tn = total = same = both = 0
    for lab, a, b, perm in zip(labels, first, shuffled, perms):
        b_orig = [None] * len(lab)
        for new_pos, old_pos in enumerate(perm):
            b_orig[old_pos] = b.verdicts[new_pos] if b.verdicts else None
        for k, y in enumerate(lab):
            total += 1
            v = a.verdicts[k] if a.verdicts else None
            if v is not None:
                pred = v >= 0.5
                tp += pred and y == 1
                fp += pred and y == 0
                fn += (not pred) and y == 1
                tn += (not pred) and y == 0
            if v is not None and b_orig[k] is not None:
                both += 1
                same += (v >= 0.5) == (b_orig[k] >= 0.5)
    usable = tp + fp + fn + tn
    metrics = {"calibrate/facts": total, "calibrate/coverage": usable / max(1, total),
               "calibrate/accuracy": (tp + tn) / max(1, usable),
               "calibrate/precision": tp / max(1, tp + fp), "calibrate/recall": tp / max(1, tp + fn),
               "calibrate/shuffle_consistency": same / max(1, both), **stats}
    metrics = {k: float(v) for k, v in metrics.items()}
    print(json.dumps(metrics, indent=1))
    return metrics


SUBCOMMANDS = {"run": (RunArgs, run_file), "calibrate": (CalibrateArgs, calibrate)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = tyro.extras.subcommand_cli_from_dict({name: cls for name, (cls, _) in SUBCOMMANDS.items()},
                                                args=argv, prog="judge.py", description=__doc__)
    return next(fn for cls, fn in SUBCOMMANDS.values() if isinstance(args, cls))(args)


if __name__ == "__main__":
    import data

    data.quiet_libraries()
    main()
