"""The ExpertShard deployment: holds some experts of every layer and serves them over gRPC.

At start-up a replica claims a slot from the placement controller (a restarted replica takes
the slot its predecessor vacated), reads only its experts' slices of the stacked expert tensors,
opens a gRPC server on a free port of its node's address, and registers the address. It then
heartbeats, carrying its per-expert token counts for the metrics.

The port accepts ExpertShard calls only with the deployment's RPC token (made by `build_app`,
handed over in the bind arguments, never logged), at most `max_concurrent_calls` at once and
messages of at most `max_message_bytes` (the cap derived from the engine's step budget).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import torch
from ray import serve

from zayaserve.replicas.engine.device import dtype_for, resolve_device
from zayaserve.replicas.model.checkpoint_paths import resolve_model
from zayaserve.replicas.model.config import ZayaConfig
from zayaserve.replicas.model.experts import run_grouped
from zayaserve.replicas.model.loader import load_expert_side
from zayaserve.router.shard_server import ExpertShardServicer, serve_shard
from zayaserve.router.tensor_codec import MAX_MESSAGE_BYTES

log = logging.getLogger("zayaserve.expert_shard")
HEARTBEAT_S = 1.0


@serve.deployment(max_ongoing_requests=100, health_check_period_s=2, health_check_timeout_s=10)
class ExpertShard:
    # Serve awaits async constructors (mypy insists __init__ returns None).
    async def __init__(  # type: ignore[misc]
        self, controller: Any, model: str, dtype: str = "auto", num_threads: int | None = None,
        device: str = "cpu", *, rpc_token: str | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES, max_concurrent_calls: int | None = None,
    ) -> None:
        import ray

        if num_threads:
            torch.set_num_threads(num_threads)
        self.controller = controller
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.slot, self.experts = await controller.claim.remote(self.replica)
        path = resolve_model(model)
        self.config = ZayaConfig.from_pretrained(path)
        self.device = resolve_device(device)
        self.weights = load_expert_side(path, self.experts, dtype_for(dtype, self.device),
                                        self.device)
        self.expert_bytes = sum(w.nbytes for w in self.weights)
        on_gpu = self.device.type != "cpu"

        def compute(layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
            # The rows arrive in host memory from gRPC: over to the experts' device and back.
            with torch.inference_mode():
                if on_gpu:
                    hidden, expert_ids, weights = (
                        t.pin_memory().to(self.device, non_blocking=True)
                        for t in (hidden, expert_ids, weights))
                out = run_grouped(self.weights[layer], hidden, expert_ids, weights)
                return out.cpu() if on_gpu else out

        self.servicer = ExpertShardServicer(self.slot, compute, self.experts, self.expert_bytes,
                                            num_layers=len(self.weights))
        # The node's address, not 0.0.0.0: the shard is reachable where Ray's peers are only.
        node_ip = ray.util.get_node_ip_address()
        self._rpc_token = rpc_token  # kept for tests that must call Info; never logged
        self.server, port = await serve_shard(
            self.servicer, host=node_ip, port=0, token=rpc_token,
            max_message_bytes=max_message_bytes, max_concurrent_rpcs=max_concurrent_calls)
        self.address = self.servicer.address
        await controller.register.remote(self.replica, self.slot, self.address)
        self._beat = asyncio.get_running_loop().create_task(self._heartbeat())
        log.info("expert shard %s holds experts %s at %s", self.slot, self.experts, self.address)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                still_mine = await self.controller.heartbeat.remote(
                    self.replica, self.slot, self.info())
                if not still_mine:  # we were presumed dead; take the slot back if it is free
                    await self.controller.register.remote(self.replica, self.slot, self.address)
            except Exception as err:  # the controller restarting must not kill the shard
                log.warning("heartbeat failed: %r", err)

    def info(self) -> dict[str, Any]:
        """What this replica holds: asked by tests and operators."""
        return {"slot": self.slot, "address": self.address, "experts": list(self.experts),
                "num_layers": len(self.weights), "expert_bytes": self.expert_bytes,
                "pid": os.getpid(),
                "tokens": {f"{layer}:{e}": n
                           for (layer, e), n in self.servicer.tokens_served.items()}}

    async def check_health(self) -> None:
        if self._beat.done():
            raise RuntimeError("heartbeat task stopped")

    async def __del__(self) -> None:
        await self.server.stop(grace=1)
