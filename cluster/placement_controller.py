"""The placement controller deployment: one replica that owns the expert placement (slots,
epochs, the two-phase change), resize operations, the autoscaler and EPLB (`controller_state`),
and sums every replica's stats.

Shard replicas claim a slot at start-up, register when their experts are loaded, and heartbeat;
each answer tells them what to hold and how many shards Serve should run. Attention workers poll
the routing map (`placement`) and report their stats; the answer tells them how many workers
Serve should run. A tick moves changes along even when nobody calls. Every method is a
coroutine, so they and the tick run one at a time on the replica's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from zayaserve.cluster.autoscale_policy import AutoscalingConfig
from zayaserve.cluster.controller_state import ControllerState
from zayaserve.cluster.elastic_config import EplbConfig
from zayaserve.cluster.placement_tracing import PlacementTracer
from zayaserve.cluster.scale_ops import ScaleConflict, ScaleError, ScaleRefused, ScaleTooSoon
from zayaserve.replicas.observability.tracing import TracingConfig
from zayaserve.replicas.observability.tracing import configure as configure_tracing

log = logging.getLogger("zayaserve.placement_controller")
TICK_S = 0.25


@serve.deployment(max_ongoing_requests=1000)
class PlacementController:
    # Serve awaits async constructors (mypy insists __init__ returns None).
    async def __init__(  # type: ignore[misc]
        self, num_experts: int, num_shards: int, replication: int, attention_workers: int = 1,
        autoscaling: dict[str, Any] | None = None, eplb: dict[str, Any] | None = None,
        tracing: dict[str, Any] | None = None, scale_cooldown_s: float = 0.0,
        max_experts_per_shard: int | None = None,
    ) -> None:
        configure_tracing(TracingConfig(**(tracing or {})), "placement_controller")
        self.state = ControllerState(
            num_experts, num_shards, replication, attention_workers,
            AutoscalingConfig(**(autoscaling or {})), EplbConfig(**(eplb or {})),
            max_experts_per_shard=max_experts_per_shard)
        self.scale_cooldown_s = scale_cooldown_s
        self.tracer = PlacementTracer()  # spans of epochs and resizes (tracing on only)
        self._tick = asyncio.get_running_loop().create_task(self._ticks())

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.state.tick(time.monotonic())
                self.tracer.observe(self.state)
            except Exception:  # a bug here must not stop the cluster from serving
                log.exception("placement tick failed")

    async def claim(self, replica: str) -> tuple[str, list[int]]:
        return self.state.placement.claim(replica, time.monotonic())

    async def register(self, replica: str, slot: str, address: str,
                       held: list[int] | None = None) -> bool:
        return self.state.placement.register(replica, slot, address, held or [],
                                             time.monotonic())

    async def heartbeat(self, replica: str, slot: str,
                        stats: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.state.heartbeat(replica, slot, stats, time.monotonic())

    async def leave(self, replica: str, slot: str) -> None:
        self.state.placement.leave(replica, slot, time.monotonic())

    async def placement(self) -> dict[str, Any]:
        now = time.monotonic()
        out = self.state.placement.placement(now)
        out["desired_workers"] = self.state.desired_workers(now)
        return out

    async def view(self) -> dict[str, Any]:
        return self.state.view(time.monotonic())

    async def report_worker(self, replica: str, stats: dict[str, Any]) -> dict[str, Any]:
        return self.state.report_worker(replica, stats, time.monotonic())

    async def stats(self) -> dict[str, Any]:
        return self.state.stats(time.monotonic())

    async def scale(self, expert_shards: int | None = None,
                    attention_workers: int | None = None) -> dict[str, Any]:
        """A resize by hand: {"operation": ..., "created": bool} or {"error": kind, ...}
        (returned, not raised: the ingress maps them to 400 / 409 / 429)."""
        if self.state.autoscaling.enabled:
            return {"error": "invalid", "message": "autoscaling.enabled: the autoscaler owns "
                    "both deployments' counts; deploy with autoscaling off to resize by hand"}
        try:
            op, created = self.state.ops.start(
                expert_shards, attention_workers, time.monotonic(), time.time(),
                self.state.shard_budget(), self.scale_cooldown_s)
        except ScaleError as err:
            return {"error": "invalid", "message": str(err)}
        except ScaleConflict as err:
            return {"error": "conflict", "message": str(err), "operation": err.operation}
        except ScaleRefused as err:
            return {"error": "conflict", "message": str(err), "param": "expert_shards"}
        except ScaleTooSoon as err:
            return {"error": "rate_limited", "message": str(err),
                    "retry_after_s": err.retry_after_s}
        return {"operation": op, "created": created}

    async def operation(self, op_id: str) -> dict[str, Any] | None:
        self.state.ops.advance(time.monotonic())
        return self.state.ops.get(op_id)
