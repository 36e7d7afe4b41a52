"""The ExpertShard deployment: holds some experts of every layer and serves them over gRPC.

At start-up a replica claims a slot from the placement controller (a restarted replica takes
the slot its predecessor vacated; with none vacant, a new slot joins), reads only its experts'
slices of the stacked expert tensors, opens a gRPC server on a free port of its node's address,
and registers the address. It then heartbeats, carrying what it holds and its per-expert token
counts; the answer says what to hold (a new epoch's experts are loaded off the serving path, then
swapped in) and how many shards Serve should run, which it hands to Serve's autoscaling policy.
When Serve stops it, it leaves the map and drains before closing its port.

The port accepts ExpertShard calls only with the deployment's RPC token (made by `build_app`,
handed over in the bind arguments, never logged), at most `max_concurrent_calls` at once and
messages of at most `max_message_bytes` (the cap derived from the engine's step budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from ray import serve

from zayaserve.replicas.cluster_messages import AutoscalingReport, ShardAnswer, ShardReport
from zayaserve.replicas.engine.device import dtype_for, free_memory_bytes, resolve_device
from zayaserve.replicas.model.checkpoint_paths import resolve_model
from zayaserve.replicas.model.config import ZayaConfig
from zayaserve.replicas.model.experts import run_grouped
from zayaserve.replicas.model.loader import load_expert_side
from zayaserve.replicas.observability.tracing import TracingConfig
from zayaserve.replicas.observability.tracing import configure as configure_tracing
from zayaserve.replicas.observability.tracing import flush as flush_traces
from zayaserve.router.shard_server import ExpertShardServicer, serve_shard
from zayaserve.router.tensor_codec import MAX_MESSAGE_BYTES

log = logging.getLogger("zayaserve.expert_shard")
HEARTBEAT_S = 1.0
# A leaving shard keeps serving this long after leaving the map: the attention workers re-read
# the map every 0.5 s, so their dispatches stop coming before it closes.
DRAIN_S = 1.5


@serve.deployment(max_ongoing_requests=100, health_check_period_s=2, health_check_timeout_s=10)
class ExpertShard:
    # Serve awaits async constructors (mypy insists __init__ returns None).
    async def __init__(  # type: ignore[misc]
        self, controller: Any, model: str, dtype: str = "auto", num_threads: int | None = None,
        device: str = "cpu", *, rpc_token: str | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES, max_concurrent_calls: int | None = None,
        tracing: dict[str, Any] | None = None,
    ) -> None:
        import ray

        configure_tracing(TracingConfig(**(tracing or {})), "expert_shard")

        if num_threads:
            torch.set_num_threads(num_threads)
        self.controller = controller
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.slot, hold = await controller.claim.remote(self.replica)
        self.path = resolve_model(model)
        self.config = ZayaConfig.from_pretrained(self.path)
        self.device = resolve_device(device)
        self.dtype = dtype_for(dtype, self.device)
        self.experts: list[int] = []
        self.servicer = ExpertShardServicer(self.slot, self._compute_over([]), [], 0,
                                            num_layers=self.config.num_hidden_layers)
        await self._hold(hold)
        # The node's address, not 0.0.0.0: the shard is reachable where Ray's peers are only.
        node_ip = ray.util.get_node_ip_address()
        self._rpc_token = rpc_token  # kept for tests that must call Info; never logged
        self.server, port = await serve_shard(
            self.servicer, host=node_ip, port=0, token=rpc_token,
            max_message_bytes=max_message_bytes, max_concurrent_rpcs=max_concurrent_calls)
        self.address = self.servicer.address
        self.desired_shards: float | None = None
        self._leaving = False
        self._loading: asyncio.Task[None] | None = None
        await controller.register.remote(self.replica, self.slot, self.address, self.experts)
        self._beat = asyncio.get_running_loop().create_task(self._heartbeat())
        log.info("expert shard %s holds experts %s at %s", self.slot, self.experts, self.address)

    def _compute_over(self, weights: list[Any]) -> Callable[..., torch.Tensor]:
        on_gpu = self.device.type != "cpu"

        def compute(layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                    row_weights: torch.Tensor) -> torch.Tensor:
            # The rows arrive in host memory from gRPC: over to the experts' device and back.
            with torch.inference_mode():
                if on_gpu:
                    hidden, expert_ids, row_weights = (
                        t.pin_memory().to(self.device, non_blocking=True)
                        for t in (hidden, expert_ids, row_weights))
                out = run_grouped(weights[layer], hidden, expert_ids, row_weights)
                return out.cpu() if on_gpu else out

        return compute

    async def _hold(self, experts: list[int]) -> None:
        """Serve exactly `experts` (every layer): read their slices off the serving path, then
        swap experts and weights in one step (calls in flight finish on the old ones)."""
        experts = sorted(experts)
        if experts == self.experts:
            return
        try:
            weights = await asyncio.to_thread(load_expert_side, self.path, experts, self.dtype,
                                              self.device)
        except Exception:  # keep serving what we hold; the next heartbeat asks again
            log.exception("expert shard %s could not load experts %s", self.slot, experts)
            if not self.experts:
                raise  # at start-up: nothing to serve, let Serve retry the replica
            return
        self.servicer.set_holding(experts, self._compute_over(weights),
                                  sum(w.nbytes for w in weights))
        self.experts = experts
        log.info("expert shard %s now holds experts %s", self.slot, experts)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                answer: ShardAnswer = await self.controller.heartbeat.remote(
                    self.replica, self.slot, self.report())
                if not answer.ok and not self._leaving:
                    # We were presumed dead: take the slot back if it is free, else a new one.
                    if not await self.controller.register.remote(
                            self.replica, self.slot, self.address, self.experts):
                        self.slot, hold = await self.controller.claim.remote(self.replica)
                        self.servicer.shard_id = self.slot
                        await self._hold(hold)
                        await self.controller.register.remote(self.replica, self.slot,
                                                              self.address, self.experts)
                    continue
                self.desired_shards = float(answer.desired_shards)
                if sorted(answer.hold) != self.experts and (
                        self._loading is None or self._loading.done()):
                    self._loading = asyncio.get_running_loop().create_task(
                        self._hold(list(answer.hold)))
            except Exception as err:  # the controller restarting must not kill the shard
                log.warning("heartbeat failed: %r", err)

    def report(self) -> ShardReport:
        """The heartbeat's content."""
        return ShardReport(tuple(self.experts), self.servicer.rows_in_flight,
                           self.capacity_experts(), dict(self.servicer.tokens_served))

    def info(self) -> dict[str, Any]:
        """What this replica holds: asked by tests and operators."""
        return {"slot": self.slot, "address": self.address, "experts": list(self.experts),
                "num_layers": self.servicer.num_layers,
                "expert_bytes": self.servicer.expert_bytes, "pid": os.getpid(),
                "queue_rows": self.servicer.rows_in_flight,
                "capacity_experts": self.capacity_experts()}

    def capacity_experts(self) -> int | None:
        """The most experts this shard could hold: what it holds plus what 80% of the free
        memory of its device (host memory on CPUs) fits (None: unknown)."""
        if not self.experts or not self.servicer.expert_bytes:
            return None
        per_expert = self.servicer.expert_bytes / len(self.experts)
        free = free_memory_bytes(self.device)
        if free is None:
            return None
        return len(self.experts) + int(0.8 * free // per_expert)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook: the shard count the placement controller wants (Serve's policy for
        this deployment follows it) and this shard's queued rows."""
        return AutoscalingReport(desired_shards=self.desired_shards,
                                 queue_rows=float(self.servicer.rows_in_flight)).metrics()

    async def check_health(self) -> None:
        if self._beat.done():
            raise RuntimeError("heartbeat task stopped")

    async def __del__(self) -> None:
        """Serve is stopping this replica (a scale-down, or a replacement): leave the routing
        map, give the routers time to read it, let calls in flight finish, then close."""
        self._leaving = True
        with contextlib.suppress(Exception):
            await self.controller.leave.remote(self.replica, self.slot)
            await asyncio.sleep(DRAIN_S)
            deadline = time.monotonic() + DRAIN_S * 4
            while self.servicer.rows_in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self._beat.cancel()
        await self.server.stop(grace=1)
        self.servicer.trace_spans.close()
        flush_traces()
