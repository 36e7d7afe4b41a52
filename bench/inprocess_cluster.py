"""A disaggregated zayaserve in one process, for benchmarks that need low noise: expert shards
serving gRPC on a loop thread of their own, one engine whose experts are behind the token
router (two micro-batches, as in the cluster), and the OpenAI REST app over it, reached through
httpx's ASGI transport. Everything the serving path runs is there except Ray Serve's transport;
tracing, being per process, can be switched between rounds."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import torch


class InProcessCluster:
    def __init__(self, model: str, num_shards: int = 2, **engine_kw: Any) -> None:
        from zayaserve.cluster.frontend.engine_client import LocalEngineClient
        from zayaserve.cluster.frontend.openai_api import build_openai_app
        from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
        from zayaserve.replicas.engine.config import EngineConfig
        from zayaserve.replicas.engine.llm_engine import LLMEngine
        from zayaserve.replicas.model.checkpoint_paths import resolve_model
        from zayaserve.replicas.model.config import ZayaConfig
        from zayaserve.router.placement import PlacementMap, compute_placement
        from zayaserve.router.remote_experts import RemoteExpertBackend

        path = resolve_model(model)
        num_experts = ZayaConfig.from_pretrained(path).num_experts
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True,
                         name="bench-shards").start()
        assignment = compute_placement(num_experts, [f"shard-{i}" for i in range(num_shards)])
        self.servers: list[Any] = []
        addresses = {}
        for shard, experts in assignment.items():
            server, address = asyncio.run_coroutine_threadsafe(
                self._start_shard(str(path), shard, experts), self.loop).result(120)
            self.servers.append(server)
            addresses[shard] = address
        replicas = {e: (s,) for s, held in assignment.items() for e in held}
        placement = PlacementMap(1, num_experts, replicas, addresses)
        self.experts = RemoteExpertBackend(lambda: placement, num_experts)
        engine = LLMEngine(EngineConfig(model=str(path), micro_batches=2, **engine_kw),
                           experts=self.experts)
        self.engine = AsyncLLMEngine(engine, max_pending_requests=4096)
        self.model_name = path.name
        self.app = build_openai_app(LocalEngineClient(self.engine, self.model_name))

    @staticmethod
    async def _start_shard(path: str, shard: str, experts: list[int]) -> tuple[Any, str]:
        from zayaserve.replicas.model.experts import run_grouped
        from zayaserve.replicas.model.loader import load_expert_side
        from zayaserve.router.shard_server import ExpertShardServicer, serve_shard

        weights = await asyncio.to_thread(load_expert_side, path, experts, torch.float32,
                                          torch.device("cpu"))

        def compute(layer: int, hidden: torch.Tensor, ids: torch.Tensor,
                    row_weights: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return run_grouped(weights[layer], hidden, ids, row_weights)

        servicer = ExpertShardServicer(shard, compute, experts,
                                       sum(w.nbytes for w in weights), num_layers=len(weights))
        server, _ = await serve_shard(servicer, host="127.0.0.1", port=0)
        return server, servicer.address

    def http_client(self) -> Any:
        import httpx

        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                 base_url="http://in-process", timeout=600)

    def close(self) -> None:
        self.engine.shutdown()
        self.experts.close()
        for server in self.servers:
            asyncio.run_coroutine_threadsafe(server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
