"""Benchmark: does the judge client keep `max_concurrency` requests in flight, and does dedup save requests?

A local OpenAI-compatible server (aiohttp, 127.0.0.1 only) answers every chat request after a
fixed latency L with a correct verdict tag per fact. N distinct requests with concurrency C
should take about ceil(N / C) * L; we require at most 1.25x that. Then the same N responses are
sent with each one repeated `dup` times: the server must see no extra requests.

    python benchmarks/bench_judge.py --n 256 --concurrency 32 --latency-s 1.0

The client costs about 2 ms of CPU per request (Python HTTP stack; measured on a shared 2-core
machine), so with very short latencies (L = 0.2 s, C = 64) the ratio reaches ~1.6 there: the
default L = 1 s is still shorter than a 32B judge needs for one judgement.

Prints the ratios and exits non-zero if a target is missed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import sys
import subprocess
import time
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from judge import JudgeArgs, build_judge  # noqa: E402


@dataclasses.dataclass
class Args:
    n: int = 256
    """number of distinct (facts, response) pairs"""
    concurrency: int = 32
    """judge max_concurrency C"""
    latency_s: float = 1.0
    """fixed server latency L per request, seconds"""
    dup: int = 4
    """copies of each pair in the dedup run"""
    max_ratio: float = 1.25
    """target: elapsed / (ceil(N/C) * L) must not exceed this"""


def serve(latency_s: float, model: str = "bench") -> None:
    """OpenAI-compatible /v1/models and /v1/chat/completions with a fixed delay, plus /count
    (chat requests received). Runs in its own process, as a real judge server would, so the
    client's CPU time does not slow the server. Prints its port on stdout."""
    from aiohttp import web

    count = 0

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def requests_seen(request):
        return web.json_response({"requests": count})

    async def chat(request):
        nonlocal count
        body = await request.json()
        count += 1
        await asyncio.sleep(latency_s)
        user = body["messages"][-1]["content"]
        k = len(set(re.findall(r"<info(\d+)>", user.split("Solution:")[0])))
        text = "".join(f"<info{i}>1</info{i}>" for i in range(1, k + 1))
        return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": model,
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}]})

    async def main():
        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_get("/count", requests_seen)
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(site._server.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(600)  # hard stop: the parent normally terminates us long before

    asyncio.run(main())


class FixedLatencyServer:
    """`serve` in a child process (127.0.0.1, random port)."""

    def __init__(self, latency_s: float, model: str = "bench"):
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_judge; bench_judge.serve({latency_s!r}, {model!r})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        self.port = int(self._proc.stdout.readline())

    @property
    def requests(self) -> int:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/count").json()["requests"]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self):
        self._proc.terminate()
        self._proc.wait(10)


def run(args: Args) -> dict[str, float]:
    server = FixedLatencyServer(args.latency_s)
    try:
        judge = build_judge(JudgeArgs(backend="openai", base_urls=(server.base_url,), model="bench",
                                      max_concurrency=args.concurrency, timeout_s=30.0))
        facts = "<info1>AB = 3</info1>\n<info2>BC = 4</info2>"
        responses = [f"response {i}" for i in range(args.n)]
        t0 = time.perf_counter()
        rewards = judge.score([facts] * args.n, responses)
        elapsed = time.perf_counter() - t0
        ideal = math.ceil(args.n / args.concurrency) * args.latency_s
        first = server.requests
        judge.score([facts] * (args.n * args.dup), responses * args.dup)
        second = server.requests - first
    finally:
        server.stop()
    out = {"n": args.n, "concurrency": args.concurrency, "latency_s": args.latency_s, "elapsed_s": elapsed,
           "ideal_s": ideal, "time_ratio": elapsed / ideal, "failures": sum(r is None for r in rewards),
           "dedup_extra_requests": second - args.n, "dedup_requests_ratio": second / args.n}
    return out


def main() -> int:
    args = tyro.cli(Args)
    out = run(args)
    for k, v in out.items():
        print(f"{k:>22}: {v:.3f}" if isinstance(v, float) else f"{k:>22}: {v}")
    ok = out["time_ratio"] <= args.max_ratio and out["dedup_extra_requests"] == 0 and out["failures"] == 0
    print("PASS" if ok else f"FAIL (targets: time_ratio <= {args.max_ratio}, 0 extra requests, 0 failures)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
