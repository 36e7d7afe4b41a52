"""The attention workers' reports summed for /metrics, so that the cluster's figures are right
whatever the workers do.

* Gauges (queue lengths, free KV blocks) sum over the *live* workers: one that stopped
  reporting drops out at once, not after a minute of stale numbers.
* Counters (keys ending in `_total`, and the engine's cumulative counts named in
  `COUNTER_KEYS`) sum over *every* worker that ever reported: a worker that leaves keeps its
  last count in the total, so a cluster counter never goes down when a worker is scaled away or
  crashes, and Prometheus' `rate()` stays right.
* Labelled samples (a list of `{label: value, ..., "value": x}`) sum per label set, by the same
  rules; histogram buckets travel this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zayaserve.replicas.cluster_messages import WorkerReport

# The engine's cumulative counts that do not end in `_total` (their names are the offline
# `LLM.stats()` API's); /metrics exports them as counters.
COUNTER_KEYS = frozenset({
    "num_preemptions", "prefix_cache_local_hit_tokens", "prefix_cache_local_queried_tokens",
    "prefix_cache_remote_hit_tokens", "prefix_cache_remote_queried_tokens",
    "prefix_cache_remote_rejected_blocks", "prefix_cache_remote_errors",
    "prefix_cache_remote_writes"})

SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # (stat key, sorted labels)


def is_counter(key: str) -> bool:
    return key.endswith(("_total", "_sum", "_count", "_bucket")) or key in COUNTER_KEYS


def _flatten(stats: Mapping[str, Any]) -> dict[SampleKey, float]:
    out: dict[SampleKey, float] = {}
    for key, value in stats.items():
        if isinstance(value, bool | int | float):
            out[(key, ())] = float(value)
        elif isinstance(value, list):
            for sample in value:
                if isinstance(sample, Mapping) and isinstance(sample.get("value"), int | float):
                    labels = tuple(sorted((str(k), str(v)) for k, v in sample.items()
                                          if k != "value"))
                    out[(key, labels)] = out.get((key, labels), 0.0) + float(sample["value"])
    return out


class WorkerTotals:
    def __init__(self, live_s: float = 3.0, forget_s: float = 120.0) -> None:
        self.live_s, self.forget_s = live_s, forget_s
        # worker -> (last report's time, the report, its samples flattened for summing)
        self._latest: dict[str, tuple[float, WorkerReport, dict[SampleKey, float]]] = {}
        self._retired: dict[SampleKey, float] = {}  # counters of workers gone
        self._gone: dict[str, dict[SampleKey, float]] = {}  # what each one left in _retired

    def report(self, worker: str, report: WorkerReport, now: float) -> None:
        back = self._gone.pop(worker, None)
        if back is not None:  # silent long enough to be forgotten, yet alive: count it once
            for k, v in back.items():
                self._retired[k] -= v
        self._latest[worker] = (now, report, _flatten(report.samples()))

    def live(self, now: float) -> list[WorkerReport]:
        """The latest report of each worker that reported within `live_s`."""
        return [report for seen, report, _ in self._latest.values()
                if now - seen < self.live_s]

    def totals(self, now: float) -> dict[str, Any]:
        """Sums in the stats' own shape: numbers, and labelled-sample lists."""
        self._forget(now)
        sums: dict[SampleKey, float] = dict(self._retired)
        for seen, _, flat in self._latest.values():
            live = now - seen < self.live_s
            for k, v in flat.items():
                if live or is_counter(k[0]):
                    sums[k] = sums.get(k, 0.0) + v
        out: dict[str, Any] = {}
        for (key, labels), v in sorted(sums.items()):
            if labels:
                out.setdefault(key, []).append({**dict(labels), "value": v})
            else:
                out[key] = v
        return out

    def _forget(self, now: float) -> None:
        for worker in [w for w, (seen, *_) in self._latest.items()
                       if now - seen > self.forget_s]:
            *_, flat = self._latest.pop(worker)
            kept = {k: v for k, v in flat.items() if is_counter(k[0])}
            for k, v in kept.items():
                self._retired[k] = self._retired.get(k, 0.0) + v
            self._gone[worker] = kept
            while len(self._gone) > 1024:  # ids of long-gone workers: keep the newest
                self._gone.pop(next(iter(self._gone)))
