"""The placement controller deployment: one replica that owns the expert placement (slots,
epochs, the two-phase change), resize operations, the autoscaler and EPLB (`controller_state`),
and sums every replica's stats.

Shard replicas claim a slot at start-up, register when their experts are loaded, and heartbeat;
each answer tells them what to hold and how many shards Serve should run. Attention workers poll
the routing map (`placement`) and report their stats; the answer tells them how many workers
Serve should run. A tick moves changes along even when nobody calls. Every method is a
coroutine, so they and the tick run one at a time on the replica's event loop.

What must outlive this replica (epoch, map version, slots, desired counts, the cooldown, resize
operations) is written to a `ControllerStore` (Ray's GCS key-value store) when it changes: at
each tick, and before any answer that shows an epoch, a map version or an operation, so that
nothing outside ever saw a state the store does not hold. `__init__` reads it back: Serve
restarting a dead controller resumes the placement and any resize in flight, under the next
*generation*; maps are ordered by (generation, version), and versions keep growing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ray import serve

from zayaserve.cluster.control.controller_state import ControllerState
from zayaserve.cluster.control.controller_store import (
    ControllerRecord,
    ControllerStore,
    GcsControllerStore,
    store_key,
)
from zayaserve.cluster.control.elastic_config import AutoscalingConfig, EplbConfig
from zayaserve.cluster.control.placement_tracing import PlacementTracer
from zayaserve.cluster.control.scale_ops import (
    ScaleConflict,
    ScaleError,
    ScaleRefused,
    ScaleTooSoon,
)
from zayaserve.cluster.frontend.migration import MigrationCounts
from zayaserve.replicas.cluster_messages import (
    PlacementUpdate,
    ShardAnswer,
    ShardReport,
    WorkerAnswer,
    WorkerReport,
)
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
        max_experts_per_shard: int | None = None, *, store: ControllerStore | None = None,
    ) -> None:
        """`store`: where the state outlives the replica (default: Ray's GCS, keyed by app)."""
        configure_tracing(TracingConfig(**(tracing or {})), "placement_controller")
        self.clock: Callable[[], float] = time.monotonic  # a simulation sets its own
        self.state = ControllerState(
            num_experts, num_shards, replication, attention_workers,
            AutoscalingConfig(**(autoscaling or {})), EplbConfig(**(eplb or {})),
            max_experts_per_shard=max_experts_per_shard)
        self.scale_cooldown_s = scale_cooldown_s
        self.record = _open_record(store)
        stored, same = self.record.start()
        if stored is not None:
            log.warning("placement controller generation %d: %s", self.record.generation,
                        self.state.restore(stored, self.clock(), time.time(),
                                           self.record.generation, resume=same))
        self._persist()
        self._shown: tuple[int, int] | None = None  # the newest map order shown (and stored)
        self.tracer = PlacementTracer()  # spans of epochs and resizes (tracing on only)
        self._tick = asyncio.get_running_loop().create_task(self._ticks())

    def _persist(self, strict: bool = False) -> None:
        """Writes the durable state if it changed. `strict`: the answer about to go out shows
        it, so a failed write raises (the caller keeps what it had and asks again)."""
        try:
            saved = self.record.save(self.state.snapshot(self.clock(), time.time()))
        except Exception:
            if strict:
                raise
            log.exception("placement controller: saving its state failed")
            return
        if strict and not saved:  # a later generation runs: it alone publishes maps
            raise RuntimeError(f"placement controller generation {self.record.generation} "
                               f"superseded by a later one")

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick(self.clock())
            except Exception:  # a bug here must not stop the cluster from serving
                log.exception("placement tick failed")

    def tick(self, now: float) -> None:
        self.state.tick(now)
        self.tracer.observe(self.state)
        self._persist()

    async def claim(self, replica: str) -> tuple[str, list[int]]:
        return self.state.placement.claim(replica, self.clock())

    async def register(self, replica: str, slot: str, address: str,
                       held: list[int] | None = None) -> bool:
        return self.state.placement.register(replica, slot, address, held or [],
                                             self.clock())

    async def heartbeat(self, replica: str, slot: str,
                        report: ShardReport | None = None) -> ShardAnswer:
        return self.state.heartbeat(replica, slot, report, self.clock())

    async def leave(self, replica: str, slot: str) -> None:
        self.state.placement.leave(replica, slot, self.clock())

    async def placement(self, known: tuple[int, int] | None = None) -> PlacementUpdate | None:
        """The routing map; workers adopt it only if its (generation, version) is newer. None:
        the caller already holds it (`known`, the order of its map). The map is as of the last
        tick or change (a quarter second at most): thousands of polls a second cost a lookup."""
        out = self.state.placement.update(self.record.generation)
        if out.order == known:
            return None
        if out.order != self._shown:  # a map not shown before: stored before anyone sees it
            self._persist(strict=True)
            self._shown = out.order
        return out

    async def view(self) -> dict[str, Any]:
        out = self.state.view(self.clock())
        out["generation"] = self.record.generation
        self._persist(strict=True)
        return out

    async def report_worker(self, replica: str, report: WorkerReport) -> WorkerAnswer:
        return self.state.report_worker(replica, report, self.clock())

    async def report_ingress(self, replica: str, migrations: MigrationCounts) -> None:
        self.state.ingress.report(replica, migrations)

    async def stats(self) -> dict[str, Any]:
        out = self.state.stats(self.clock())
        self._persist()
        return out

    async def scale(self, expert_shards: int | None = None,
                    attention_workers: int | None = None) -> dict[str, Any]:
        """A resize by hand: {"operation": ..., "created": bool} or {"error": kind, ...}
        (returned, not raised: the ingress maps them to 400 / 409 / 429)."""
        if self.state.autoscaling.enabled:
            return {"error": "invalid", "message": "autoscaling.enabled: the autoscaler owns "
                    "both deployments' counts; deploy with autoscaling off to resize by hand"}
        try:
            op, created = self.state.ops.start(
                expert_shards, attention_workers, self.clock(), time.time(),
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
        self._persist()  # a resize the caller was told of survives a restart
        return {"operation": op, "created": created}

    async def operation(self, op_id: str) -> dict[str, Any] | None:
        self.state.ops.advance(self.clock())
        self._persist()
        return self.state.ops.get(op_id)


def _open_record(store: ControllerStore | None) -> ControllerRecord:
    """The store given, or the GCS one of this replica's app; the deployment it belongs to is
    Serve's code version of this deployment (kept when Serve restarts a replica, new with
    each deploy)."""
    if store is not None:
        return ControllerRecord(store)
    ctx = serve.get_replica_context()
    return ControllerRecord(GcsControllerStore(store_key(ctx.app_name)), ctx.code_version)
