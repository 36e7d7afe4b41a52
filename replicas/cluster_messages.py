"""What the replicas and the placement controller send each other, defined once for both sides.

    attention worker --WorkerReport-->    controller --WorkerAnswer-->     worker
    expert shard     --ShardReport-->     controller --ShardAnswer-->      shard
    attention worker --(asks)-->          controller --PlacementUpdate-->  worker
    either replica   --AutoscalingReport (Serve's dict of floats)-->      Serve's autoscaler
    attention worker --RoutingStats (Serve's dict of floats)-->           Serve's request router
                       (in routing_stats.py: the request router must import it without torch)

They travel as Ray objects (pickled), so a field added here is seen by both ends at once; the
names of the numbers that reach /metrics are the fields' own (`WorkerReport.samples`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from zayaserve.replicas.engine.engine_stats import EngineStats
from zayaserve.replicas.engine.latency_window import LatencyPercentiles
from zayaserve.router.placement import PlacementMap
from zayaserve.router.router_stats import LatencyHistogram, RouterStats

# The metric names Serve's follow-the-controller policy reads (cluster/control/serve_autoscaling).
WORKER_METRIC, SHARD_METRIC = "desired_workers", "desired_shards"

@dataclass(frozen=True, slots=True)
class WorkerReport:
    """An attention worker's numbers, once a second: its engine's, its step count, its recent
    p90 TTFT and inter-token latency (for the autoscaler, not summed into /metrics), and (with
    remote experts) its token router's counters and per-shard round-trip histogram."""

    engine: EngineStats
    engine_steps: int
    router: RouterStats | None = None
    dispatch_latency: LatencyHistogram | None = None
    latency: LatencyPercentiles | None = None

    def numbers(self) -> dict[str, float]:
        """The plain numbers, under their /metrics names."""
        out: dict[str, float] = {**self.engine.as_dict(), "engine_steps_total": self.engine_steps}
        if self.router is not None:
            out.update(self.router.as_dict())
        return out

    def samples(self) -> dict[str, object]:
        """Flat, under their /metrics names: numbers, and the histogram's labelled samples."""
        out: dict[str, object] = dict(self.numbers())
        if self.dispatch_latency is not None:
            out.update(self.dispatch_latency.samples())
        return out


@dataclass(frozen=True, slots=True)
class WorkerAnswer:
    desired_workers: int  # how many attention workers Serve should run


@dataclass(frozen=True, slots=True)
class ShardReport:
    """An expert shard's heartbeat: the experts it holds (loaded, every layer), token rows in
    flight, how many experts its memory could hold (None: unknown), and its cumulative token
    counts per (layer, expert), from which the controller measures expert load."""

    held: tuple[int, ...]
    queue_rows: int = 0
    capacity_experts: int | None = None
    tokens: Mapping[tuple[int, int], int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShardAnswer:
    ok: bool  # False: the slot was given away or removed (the shard re-registers)
    hold: tuple[int, ...]  # the experts the shard must hold now
    desired_shards: int  # how many expert shards Serve should run


@dataclass(frozen=True, slots=True)
class PlacementUpdate:
    """The routing map as the controller publishes it. Workers order maps by (generation,
    version) and adopt only a newer one (`order`); a worker that already holds the newest is
    answered None instead (a thousand workers poll twice a second). `assignment` (slot ->
    committed experts) and `epoch` are for operators and tests."""

    generation: int
    version: int
    epoch: int
    num_experts: int
    replicas: Mapping[int, tuple[str, ...]]
    addresses: Mapping[str, str]
    assignment: Mapping[str, tuple[int, ...]]

    @property
    def order(self) -> tuple[int, int]:
        return self.generation, self.version

    def routing_map(self) -> PlacementMap:
        return PlacementMap(version=self.version, num_experts=self.num_experts,
                            replicas=self.replicas, addresses=self.addresses)


@dataclass(frozen=True, slots=True)
class AutoscalingReport:
    """What a replica hands Serve through `record_autoscaling_stats`: the count the controller
    wants for its deployment (None until the first answer) and, from a shard, its queued rows."""

    desired_workers: float | None = None
    desired_shards: float | None = None
    queue_rows: float | None = None

    def metrics(self) -> dict[str, float]:
        """Serve's form: a dict of floats, absent values left out."""
        named = {WORKER_METRIC: self.desired_workers, SHARD_METRIC: self.desired_shards,
                 "queue_rows": self.queue_rows}
        return {k: v for k, v in named.items() if v is not None}


__all__ = ["SHARD_METRIC", "WORKER_METRIC", "AutoscalingReport", "PlacementUpdate", "ShardAnswer",
           "ShardReport", "WorkerAnswer", "WorkerReport"]
