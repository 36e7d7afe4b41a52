"""The request path that docs/structure.md describes is the one the code takes.

A streaming chat request goes through the REST app, the engine and the token router to two
in-process expert shards over real gRPC, with a profiler on every thread. Every hand-written
file that runs code for it must be classified here, as control flow (listed, in order, in
docs/structure.md) or as support (data, validation, model maths, kernels); a file on the path
that nobody classified, or a listed file the request never reaches, fails the test."""

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
from test_openai_api import ENGINE_KW, MODEL, httpx
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

# Files that decide what happens to the request, in the order it meets them. The doc lists
# each one; the three Ray-side files run only under Serve, so this in-process run cannot see
# them and the doc's list holds them in addition.
CONTROL = [
    "cluster/frontend/openai_api.py", "cluster/frontend/openai_chat.py",
    "cluster/frontend/streams.py",
    "cluster/frontend/engine_client.py", "replicas/engine/async_engine.py",
    "replicas/engine/llm_engine.py", "replicas/engine/step_pipeline.py",
    "replicas/engine/scheduler.py", "replicas/engine/stop_rules.py",
    "replicas/engine/output_processor.py",
    "replicas/engine/kv_manager.py", "replicas/engine/runner.py",
    "replicas/model/attention_side.py", "router/remote_experts.py", "router/token_router.py",
    "router/shard_calls.py", "router/shard_stream.py", "router/shard_server.py",
    "router/shard_stream_server.py", "replicas/engine/step_sampling.py",
    "replicas/engine/sampler.py",
]
RAY_SIDE = ["replicas/serve_request_router.py", "replicas/attention_worker.py",
            "replicas/expert_shard.py"]
# Data, validation, model maths and kernels: called on the path, deciding nothing about it.
SUPPORT = {
    "replicas/engine/noise.py", "replicas/engine/sampling_plan.py", "router/stream_wire.py",
    "replicas/model/experts.py",  # the ExpertBackend interface the remote backend implements
    "cluster/frontend/api_keys.py", "cluster/frontend/request_checks.py",
    "cluster/frontend/serving_context.py",
    "cluster/frontend/usage.py",
    "cluster/frontend/frontend_errors.py", "cluster/frontend/logprob_format.py",
    "cluster/frontend/metrics.py", "cluster/frontend/chat_options.py",
    "cluster/frontend/reasoning.py",
    "cluster/frontend/structured_request.py", "cluster/frontend/tool_calls.py",
    "replicas/engine/grammar.py",
    "replicas/model/chat_template.py",
    "cluster/frontend/openai_protocol.py", "cluster/frontend/openai_chat_protocol.py",
    "cluster/frontend/rsa_request.py", "replicas/rsa/params.py",  # reads the (absent) RSA fields
    "replicas/engine/params.py", "replicas/engine/request_limits.py",
    "replicas/engine/admission.py",  # the queue bound, a limit like request_limits
    "cluster/frontend/response_budget.py",  # the logprob budget, a limit like request_limits
    "replicas/engine/sequence.py", "replicas/engine/block_pool.py",
    "replicas/engine/outputs.py", "replicas/engine/penalties.py", "replicas/engine/logprobs.py",
    "replicas/kv_tiers/hashing.py", "replicas/model/batch.py",
    "replicas/model/cca.py", "replicas/model/config.py", "replicas/model/gate.py",
    "replicas/model/kv_cache.py", "replicas/model/layers.py", "replicas/model/tokenizer.py",
    "router/placement.py", "router/router_stats.py", "router/shard_channels.py",
    "router/dispatch_plan.py",
    "router/tensor_codec.py", "router/protos/expert_pb2_grpc.py",
    # Metrics and traces: they watch the path (docs/structure.md lists them apart).
    "cluster/frontend/request_tracker.py", "replicas/engine/request_timeline.py",
    "replicas/observability/tracing.py", "replicas/observability/genai_metrics.py",
    "replicas/observability/dispatch_tracing.py",
}


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
    unclassified = traced - set(CONTROL) - SUPPORT
    assert not unclassified, f"files on the path that nobody classified: {sorted(unclassified)}"
    unreached = set(CONTROL) - traced
    assert not unreached, f"listed as on the path, never reached: {sorted(unreached)}"


def test_doc_lists_the_control_files_in_order() -> None:
    doc = DOC.read_text()
    path_section = doc.split("## The path", 1)[1].split("\n## ", 1)[0]
    mentioned = re.findall(r"`([a-z_/]+\.py)`", path_section)
    listed = [f for f in dict.fromkeys(mentioned) if f in CONTROL or f in RAY_SIDE]
    missing = [f for f in CONTROL + RAY_SIDE if f not in listed]
    assert not missing, f"docs/structure.md does not list {missing}"
    in_doc_order = [f for f in listed if f in CONTROL]
    assert in_doc_order == CONTROL, "the doc lists the control files in another order"
    count = re.search(r"Control flow runs through (\d+) files", doc)
    assert count is not None and int(count.group(1)) == len(CONTROL) + len(RAY_SIDE)
