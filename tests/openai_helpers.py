"""What the REST front end tests share: a uvicorn server on a free port, the engine client on
the tiny checkpoint, and the names and prompts they use."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from zayaserve import SamplingParams
from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine

try:
    import httpx
except ImportError:  # some images ship the client as httpx2 (same API)
    import httpx2 as httpx  # type: ignore[no-redef]

__all__ = ["API_KEY", "CHAT", "ENGINE_KW", "MODEL", "PROMPTS", "Server", "free_port", "greedy",
           "httpx", "make_engine_client", "wait_idle"]

MODEL = "zaya-tiny"
API_KEY = "sekret"
ENGINE_KW: dict[str, Any] = dict(num_kv_blocks=128, max_model_len=256)
PROMPTS = ["hello world", "the quick brown fox", "abc", "Zyphra", "one two three"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_engine_client(path: str, **async_kw: Any) -> LocalEngineClient:
    engine = LLMEngine(EngineConfig(model=path, **ENGINE_KW))
    return LocalEngineClient(AsyncLLMEngine(engine, **async_kw), MODEL)


class Server:
    """uvicorn on a free port, on its own thread and event loop."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_idle(engine_client: LocalEngineClient, timeout: float = 20.0) -> None:
    """Until nothing runs and every KV block is back in the pool."""
    sched = engine_client.engine.engine.scheduler
    deadline = time.monotonic() + timeout
    while True:
        idle = (not engine_client.engine.engine.has_unfinished_requests() and not sched.running
                and sched.blocks.num_free == sched.blocks.num_blocks)
        if idle:
            return
        assert time.monotonic() < deadline, "requests still running / KV blocks not freed"
        time.sleep(0.02)


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)
