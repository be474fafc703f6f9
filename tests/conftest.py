"""Shared fixtures: one tiny model, one demo dataset and (on demand) one `vllm serve` per session.

vLLM on CPU costs ~10 s per engine start (imports included) and ~30 s per server start on 2
cores, so everything expensive is session-scoped and built in a temporary folder (never
downloaded).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# vLLM CPU settings (README "Troubleshooting"): engine in-process; the KV cache is sized per engine
# (data.vllm_cpu_settings in the scripts, --kv-cache-memory-bytes for the served model below).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One CPU share per xdist worker: every test process (pytest workers, the training runs and vLLM
# servers they start) would otherwise use all cores, and two workers' OpenMP thread pools spinning
# on the same two cores cost ~30 % of the suite's time (measured: two slow tests side by side,
# 141 s -> 102 s wall with one thread each).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

# The real benchmark samples live next to the checkout (../shared/data), not in it.
SHARED_DATA = Path(os.environ.get("PR1_SHARED_DATA", ROOT.parent / "shared" / "data"))



@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Keep the tests that share an expensive fixture (an engine, a served model, a warm-started
    model) on one xdist worker, and run the longest first (`slow(seconds=...)`, their cost in
    `make test` incl. the fixture), so that no long test starts last (`make test` passes
    --no-loadscope-reorder: xdist keeps this order)."""
    groups = {"vllm_server": "vllm_server", "engine": "engine", "warm_demo": "warm_demo",
              "warm_grounding": "warm_grounding"}
    for item in items:
        for fixture, group in groups.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))

    def cost(item) -> float:
        slow = item.get_closest_marker("slow")
        return -1 if slow is None else slow.kwargs.get("seconds", 0)

    items.sort(key=cost, reverse=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL checkpoint folder (built offline, seed 0)."""
    from demo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo dataset (train 64 / test 16 rows, JSONL + parquet + PNGs)."""
    from demo.demo_data import generate

    return generate(tmp_path_factory.mktemp("demo_data"), num_train=64, num_test=16, seed=0)


@pytest.fixture(scope="session")
def warm_demo(tmp_path_factory) -> tuple[Path, Path]:
    """(demo data folder, warm-started tiny model folder) exactly as `make demo` builds them: 256
    training problems, and the tiny model fine-tuned 100 steps on their solutions so that it writes
    the <think>/<answer> layout part of the time. Built once per test session (about 30 s)."""
    from demo.demo_data import generate
    from demo.tiny_model import build_tiny_model, warm_start

    root = tmp_path_factory.mktemp("warm_demo")
    demo_dir = generate(root / "demo", num_train=256, num_test=0, seed=0, parquet=False)
    model = build_tiny_model(root / "warm", seed=0)
    warm_start(model, demo_dir / "train.jsonl", steps=100, lr=3e-3, max_pixels=50_176)
    return demo_dir, model


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real benchmark slices); tests using it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark samples not found at {SHARED_DATA} (set PR1_SHARED_DATA)")
    return SHARED_DATA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir, tmp_path_factory):
    """A real OpenAI-compatible `vllm serve` (vllm-cpu) on the tiny model, started once.

    Yields a dict: base_url (ending in /v1), model (served name), api_key, log (path).
    """
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    api_key = "test-key"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--api-key", api_key,
           "--enable-prefix-caching", "--kv-cache-memory-bytes", str(64 * 2**20)]
    with open(log, "w") as fh:
        env = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}  # as our scripts do on CPU (data.vllm_cpu_settings)
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm server exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"vllm server not healthy after 300 s; log:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield {"base_url": f"{url}/v1", "model": "tiny", "api_key": api_key, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


class FakeOpenAI:
    """A scripted OpenAI-compatible server on 127.0.0.1 (aiohttp, its own thread and loop).

    `reply(body) -> str | tuple[int, str] | None` decides each /v1/chat/completions answer: a string
    is the assistant message, (status, text) an HTTP error, None an HTTP 400; an async `reply` may
    also sleep or close the connection (`request` is passed when it takes two arguments).
    `/v1/models` lists `models`. `ports` holds two listening ports (several-URL tests); every chat
    request body is kept in `requests`, and `max_in_flight` is the most requests answered at once.
    Use as a context manager or start()/stop().
    """

    def __init__(self, reply, models=("fake",), lifetime_s: float = 900.0):
        import threading

        self.reply, self.models, self.lifetime_s = reply, list(models), lifetime_s
        self.requests: list[dict] = []  # bodies, with the port and Authorization header added
        self.in_flight = self.max_in_flight = 0  # requests being answered now / at most so far
        self.lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}/v1" for p in self.ports]

    @property
    def base_url(self) -> str:
        return self.urls[0]

    async def _chat(self, request):
        import asyncio
        import inspect

        from aiohttp import web

        body = await request.json()
        body["_port"], body["_auth"] = request.url.port, request.headers.get("Authorization")
        with self.lock:
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            nargs = len(inspect.signature(self.reply).parameters)
            out = self.reply(body, request) if nargs == 2 else self.reply(body)
            if asyncio.iscoroutine(out):
                out = await out
        finally:
            with self.lock:
                self.in_flight -= 1
        if isinstance(out, web.StreamResponse):
            return out
        if out is None:
            return web.json_response({"error": {"message": "no script for this request"}}, status=400)
        if isinstance(out, tuple):
            status, text, *headers = out
            return web.Response(status=status, text=text, headers=headers[0] if headers else None)
        return web.json_response({
            "id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": out}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(out.split()), "total_tokens": 10 + len(out.split())}})

    def start(self) -> "FakeOpenAI":
        import asyncio
        import threading

        from aiohttp import web

        ready = threading.Event()

        async def serve():
            app = web.Application(client_max_size=64 * 2**20)
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_get("/v1/models", lambda r: web.json_response(
                {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            sites = [web.TCPSite(runner, "127.0.0.1", 0) for _ in range(2)]
            for site in sites:
                await site.start()
            self.ports = [s._server.sockets[0].getsockname()[1] for s in sites]
            self._stop = asyncio.Event()
            ready.set()
            try:  # bounded: the server stops by itself after lifetime_s
                await asyncio.wait_for(self._stop.wait(), self.lifetime_s)
            except asyncio.TimeoutError:
                pass
            await runner.cleanup()

        def run():
            self.loop = asyncio.new_event_loop()
            self.loop.run_until_complete(serve())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(20), "fake OpenAI server did not start"
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> Path:
    """The four perception-task demo datasets (demo/demo_data.py --task all): 32 train and 8 test
    rows each, in <root>/<task>/."""
    from demo.demo_data import TASKS, generate_task

    root = tmp_path_factory.mktemp("task_data")
    for task in TASKS:
        generate_task(root / task, task, num_train=32, num_test=8, seed=0)
    return root


@pytest.fixture(scope="session")
def warm_grounding(tmp_path_factory) -> tuple[Path, Path]:
    """(grounding demo data, the tiny model warm-started 80 steps on its JSON box answers)."""
    from demo.demo_data import generate_task
    from demo.tiny_model import build_tiny_model, warm_start

    root = tmp_path_factory.mktemp("warm_grounding")
    data_dir = generate_task(root / "grounding", "grounding", num_train=128, num_test=16, seed=0)
    model = build_tiny_model(root / "model", seed=0)
    warm_start(model, data_dir / "train.jsonl", steps=80, lr=3e-3, max_pixels=50_176)
    return data_dir, model
