"""The request path that docs/structure.md describes is the one the code takes.

A streaming chat request goes through the REST app, the engine and the token router to two
in-process expert shards over real gRPC, with a profiler on every thread. The files that ran
must be exactly the page's list of every file one request runs (kernels aside: which run
depends on the implementation chosen), and each file the list marks as deciding must be
described in the page's walk-through of the path. The page is the only list."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from openai_helpers import ENGINE_KW, MODEL, httpx
from test_token_router import E, start_cluster

import zayaserve
from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.openai_api import build_openai_app
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.router.placement import PlacementMap
from zayaserve.router.remote_experts import RemoteExpertBackend

ROOT = Path(zayaserve.__file__).resolve().parent
DOC = ROOT / "docs" / "structure.md"
FILES_DOC = ROOT / "docs" / "request-files.md"



def page() -> dict[str, str]:
    """docs/request-files.md's list of every file one request runs: path -> its role
    ("decides", "supports", "decides, Ray only")."""
    found = re.findall(r"^- `([\w/]+\.py)` \((decides|supports|decides, Ray only)\)",
                       FILES_DOC.read_text(), re.M)
    assert len(found) > 40, "docs/request-files.md lost its list of the files a request runs"
    return dict(found)


class _Tracer:
    """Records the package files whose functions run, on every thread started after it."""

    def __init__(self) -> None:
        self.on = False
        self.files: set[str] = set()
        self.root = str(ROOT) + "/"

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if self.on and event == "call":
            name = frame.f_code.co_filename
            if (name.startswith(self.root) and "/tests/" not in name
                    and "-packages/" not in name):
                self.files.add(name[len(self.root):])


@pytest.fixture()
def tracer() -> Iterator[_Tracer]:
    tracer = _Tracer()
    threading.setprofile(tracer)
    try:
        yield tracer
    finally:
        tracer.on = False
        threading.setprofile(None)  # type: ignore[arg-type]


def _is_kernel(path: str) -> bool:
    return path.startswith("kernels/")


def test_streaming_chat_path_is_the_documented_one(tiny_checkpoint: Path,
                                                   tracer: _Tracer) -> None:
    maps: list[PlacementMap] = []
    experts = RemoteExpertBackend(lambda: maps[-1], E, timeout_s=60)
    shards, placement = experts.run(start_cluster(str(tiny_checkpoint), 2), timeout=60)
    maps.append(placement)
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), **ENGINE_KW), experts=experts)
    client = LocalEngineClient(AsyncLLMEngine(engine), MODEL)
    app = build_openai_app(client)
    body = {"model": MODEL, "stream": True, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "where do requests go?"}]}

    async def request() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            await http.post("/v1/chat/completions", json=body)  # warm up lazy imports
            tracer.on = True
            sys.setprofile(tracer)
            try:
                answer = await http.post("/v1/chat/completions", json=body)
            finally:
                sys.setprofile(None)
                tracer.on = False
            assert answer.status_code == 200, answer.text
            return answer.text

    try:
        text = asyncio.run(request())
    finally:
        client.engine.shutdown()
        for shard in shards.values():
            experts.run(shard.stop(), timeout=30)
        experts.close()
    assert text.count("data: ") >= 4 and text.endswith("data: [DONE]\n\n")
    assert sum(s.servicer.rows_served for s in shards.values()) > 0, "no expert shard was used"

    traced = {f for f in tracer.files if not _is_kernel(f)}
    listed = {f for f, role in page().items() if not _is_kernel(f) and "Ray only" not in role}
    assert not traced - listed, f"ran, but not in {FILES_DOC.name}: {sorted(traced - listed)}"
    assert not listed - traced, f"in {FILES_DOC.name}, but never ran: {sorted(listed - traced)}"


def test_the_path_describes_every_deciding_file() -> None:
    """Each file the list marks as deciding is described in the path's walk-through."""
    doc = DOC.read_text()
    path_section = doc.split("## The path", 1)[1].split("\n## ", 1)[0]
    described = set(re.findall(r"`([a-z_/]+\.py)`", path_section))
    deciding = [f for f, role in page().items() if role.startswith("decides")]
    missing = [f for f in deciding if f not in described]
    assert not missing, f"the path in docs/structure.md does not describe {missing}"
    count = re.search(r"runs code in (\d+) hand-written files \(listed in\s+\[request-files\.md\]"
                      r"\(request-files\.md\)\); (\d+) of", doc)
    assert count is not None
    assert (int(count.group(1)), int(count.group(2))) == (len(page()), len(deciding))
