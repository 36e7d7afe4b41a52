"""The attention workers' reports summed for /metrics, so that the cluster's figures are right
whatever the workers do.

* Gauges (queue lengths, free KV blocks) sum over the *live* workers: one that stopped
  reporting drops out at once, not after a minute of stale numbers.
* Counters (keys ending in `_total`, and the engine's cumulative counts named in
  `COUNTER_KEYS`) sum over *every* worker that ever reported: a worker that leaves keeps its
  last count in the total, so a cluster counter never goes down when a worker is scaled away or
  crashes, and Prometheus' `rate()` stays right.
* The dispatch round-trip histograms are counters too, summed per shard.

A report is only stored when it arrives (a thousand workers report every second); the sums are
made when asked for, at a scrape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zayaserve.replicas.cluster_messages import WorkerReport
from zayaserve.router.router_stats import LatencyHistogram, sum_histograms

# The engine's cumulative counts that do not end in `_total` (their names are the offline
# `LLM.stats()` API's); /metrics exports them as counters.
COUNTER_KEYS = frozenset({
    "num_preemptions", "prefix_cache_local_hit_tokens", "prefix_cache_local_queried_tokens",
    "prefix_cache_remote_hit_tokens", "prefix_cache_remote_queried_tokens",
    "prefix_cache_remote_rejected_blocks", "prefix_cache_remote_errors",
    "prefix_cache_remote_writes"})


def is_counter(key: str) -> bool:
    return key.endswith(("_total", "_sum", "_count", "_bucket")) or key in COUNTER_KEYS


@dataclass
class _Sums:
    numbers: dict[str, float] = field(default_factory=dict)
    histograms: list[LatencyHistogram] = field(default_factory=list)

    def add(self, report: WorkerReport, counters_only: bool, sign: int = 1) -> None:
        """Adds (sign -1: takes back) a report's numbers and its histogram."""
        for k, v in report.numbers().items():
            if not counters_only or is_counter(k):
                self.numbers[k] = self.numbers.get(k, 0.0) + sign * v
        if report.dispatch_latency is not None:
            self.histograms.append(report.dispatch_latency.scaled(sign))

    def copy(self) -> _Sums:
        return _Sums(dict(self.numbers), list(self.histograms))

    def compact(self) -> None:
        """One histogram instead of a list (for sums kept a long time)."""
        summed = sum_histograms(self.histograms)
        self.histograms = [summed] if summed is not None else []


class WorkerTotals:
    def __init__(self, live_s: float = 3.0, forget_s: float = 120.0) -> None:
        self.live_s, self.forget_s = live_s, forget_s
        self._latest: dict[str, tuple[float, WorkerReport]] = {}  # worker -> (time, report)
        self._retired = _Sums()  # counters of workers gone
        self._gone: dict[str, WorkerReport] = {}  # what each one left in _retired

    def report(self, worker: str, report: WorkerReport, now: float) -> None:
        back = self._gone.pop(worker, None)
        if back is not None:  # silent long enough to be forgotten, yet alive: count it once
            self._retired.add(back, counters_only=True, sign=-1)
            self._retired.compact()
        self._latest[worker] = (now, report)

    def live(self, now: float) -> list[WorkerReport]:
        """The latest report of each worker that reported within `live_s`."""
        return [report for seen, report in self._latest.values() if now - seen < self.live_s]

    def totals(self, now: float) -> dict[str, Any]:
        """Sums under the /metrics names: numbers, and the histogram as labelled samples."""
        self._forget(now)
        sums = self._retired.copy()
        for seen, report in self._latest.values():
            sums.add(report, counters_only=now - seen >= self.live_s)
        out: dict[str, Any] = dict(sorted(sums.numbers.items()))
        histogram = sum_histograms(sums.histograms)
        if histogram is not None:
            out.update(histogram.samples())
        return out

    def _forget(self, now: float) -> None:
        for worker in [w for w, (seen, _) in self._latest.items() if now - seen > self.forget_s]:
            _, report = self._latest.pop(worker)
            self._retired.add(report, counters_only=True)
            self._retired.compact()
            self._gone[worker] = report
            while len(self._gone) > 1024:  # ids of long-gone workers: keep the newest
                self._gone.pop(next(iter(self._gone)))
