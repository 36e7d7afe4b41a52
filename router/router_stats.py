"""Counters the token router keeps, for Prometheus metrics and the disaggregation benchmark."""

from __future__ import annotations

import bisect
import copy
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(slots=True)
class LayerLatency:
    """Round trips of one layer's dispatches (skip-only dispatches count, at ~0 s)."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    last_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)
        self.last_s = seconds

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else 0.0


@dataclass(slots=True)
class RouterStats:
    """Monotonic counters since the router was made (mutated only on the router's loop)."""

    dispatches: int = 0  # dispatch() calls that got past input checks
    calls: int = 0  # Dispatch RPCs attempted (one per shard per round)
    failed_calls: int = 0
    rows_sent: int = 0  # token rows put on the wire, retries included
    rows_skipped: int = 0  # skip-class rows, never sent
    rows_retried: int = 0  # rows re-sent after a failed call (failover or wait for a replica)
    retries: int = 0  # failed calls whose rows were sent again
    bytes_sent: int = 0  # serialized request bytes
    bytes_received: int = 0  # serialized reply bytes
    replica_waits: int = 0  # polls while some experts had no usable replica
    wait_s: float = 0.0  # time spent in those polls
    map_versions_seen: int = 0
    layer_latency: dict[int, LayerLatency] = field(default_factory=dict)

    def snapshot(self) -> RouterStats:
        """A copy that later dispatches do not change (taken from another thread than the
        router's loop: the per-layer dict is copied in one step before its entries)."""
        layers = {k: copy.copy(v) for k, v in dict(self.layer_latency).items()}
        return replace(self, layer_latency=layers)

    def as_dict(self) -> dict[str, int | float]:
        """Flat numbers, Prometheus-style names: counters that add up across routers, and the
        round-trip time as sum/count (per-layer detail stays in `layer_latency`)."""
        latencies = list(self.layer_latency.values())
        return {
            "router_dispatches_total": self.dispatches,
            "router_calls_total": self.calls,
            "router_failed_calls_total": self.failed_calls,
            "router_retries_total": self.retries,
            "router_rows_sent_total": self.rows_sent,
            "router_rows_skipped_total": self.rows_skipped,
            "router_rows_retried_total": self.rows_retried,
            "router_bytes_sent_total": self.bytes_sent,
            "router_bytes_received_total": self.bytes_received,
            "router_replica_waits_total": self.replica_waits,
            "router_replica_wait_seconds_total": self.wait_s,
            "router_placement_versions_seen_total": self.map_versions_seen,
            "router_dispatch_seconds_sum": sum(x.total_s for x in latencies),
            "router_dispatch_seconds_count": sum(x.count for x in latencies),
        }


# Upper bounds (s) of the dispatch round-trip histogram: sub-millisecond on one node, tens of
# milliseconds across a loaded network.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ShardLatency:
    """A histogram of answered Dispatch round trips per shard (cumulative counts, as
    Prometheus keeps them), mutated only on the router's loop."""

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}  # shard -> per bucket, then +Inf
        self._sums: dict[str, float] = {}

    def observe(self, shard: str, seconds: float) -> None:
        counts = self._counts.get(shard)
        if counts is None:
            counts = self._counts[shard] = [0] * (len(LATENCY_BUCKETS) + 1)
            self._sums[shard] = 0.0
        i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        counts[i] += 1
        self._sums[shard] += seconds

    def histogram(self) -> LatencyHistogram:
        """A copy as arrays (what a worker reports)."""
        shards = tuple(sorted(self._counts))
        counts = np.array([self._counts[s] for s in shards], dtype=np.int64).reshape(
            len(shards), len(LATENCY_BUCKETS) + 1)
        # Read from the worker's stats thread while the router's loop observes.
        sums = np.array([self._sums.get(s, 0.0) for s in shards])
        return LatencyHistogram(shards, counts, sums)


@dataclass(frozen=True, slots=True)
class LatencyHistogram:
    """Round trips per shard as arrays: `counts[i]` per bucket of LATENCY_BUCKETS then +Inf (not
    cumulative), `sums[i]` in seconds, for `shards[i]`. Arrays, so that a controller adds up a
    thousand workers' histograms over hundreds of shards in a few numpy operations."""

    shards: tuple[str, ...]
    counts: np.ndarray
    sums: np.ndarray

    def samples(self) -> dict[str, list[dict[str, str | float]]]:
        """Labelled samples (`worker_totals`' shape): cumulative `_bucket`s by `le`, `_sum`
        and `_count`, per shard."""
        buckets: list[dict[str, str | float]] = []
        sums: list[dict[str, str | float]] = []
        counts: list[dict[str, str | float]] = []
        bounds = (*map(str, LATENCY_BUCKETS), "+Inf")
        for shard, per, total in zip(self.shards, np.cumsum(self.counts, axis=1).tolist(),
                                     self.sums.tolist(), strict=True):
            buckets.extend({"shard": shard, "le": b, "value": n}
                           for b, n in zip(bounds, per, strict=True))
            sums.append({"shard": shard, "value": total})
            counts.append({"shard": shard, "value": per[-1]})
        if not buckets:
            return {}
        return {"dispatch_latency_seconds_bucket": buckets,
                "dispatch_latency_seconds_sum": sums, "dispatch_latency_seconds_count": counts}

    def scaled(self, factor: int) -> LatencyHistogram:
        if factor == 1:
            return self  # frozen: sharing it is safe
        return LatencyHistogram(self.shards, self.counts * factor, self.sums * factor)


def sum_histograms(hists: Iterable[LatencyHistogram]) -> LatencyHistogram | None:
    """Per-shard sums (None: none given). Histograms over the same shards (the usual case:
    every worker calls every shard) add as one stacked sum."""
    groups: dict[tuple[str, ...], list[LatencyHistogram]] = {}
    for h in hists:
        groups.setdefault(h.shards, []).append(h)
    if not groups:
        return None
    summed = {shards: (np.sum([h.counts for h in hs], axis=0), np.sum([h.sums for h in hs], axis=0))
              for shards, hs in groups.items()}
    if len(summed) == 1:
        [(shards, (counts, sums))] = summed.items()
        return LatencyHistogram(shards, counts, sums)
    every = tuple(sorted({s for shards in summed for s in shards}))
    index = {s: i for i, s in enumerate(every)}
    counts = np.zeros((len(every), len(LATENCY_BUCKETS) + 1), dtype=np.int64)
    sums = np.zeros(len(every))
    for shards, (c, t) in summed.items():
        rows = [index[s] for s in shards]
        np.add.at(counts, rows, c)
        np.add.at(sums, rows, t)
    return LatencyHistogram(every, counts, sums)


__all__ = ["LATENCY_BUCKETS", "LatencyHistogram", "LayerLatency", "RouterStats", "ShardLatency",
           "sum_histograms"]
