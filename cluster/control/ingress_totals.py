"""The ingress replicas' request-migration counts, summed for /metrics.

Each ingress replica reports its own counts since it started, under its Serve replica id. The
controller keeps the last report of every replica that ever reported, so the cluster's counter
does not go down when an ingress replica restarts: its successor counts from 0 under a new id,
and the dead one's last count stays in the sum. Past `MAX_REPLICAS` ids the oldest are folded
into one retired sum.
"""

from __future__ import annotations

from typing import Any

from zayaserve.cluster.frontend.migration import MigrationCounts

MAX_REPLICAS = 1024


class IngressTotals:
    def __init__(self) -> None:
        self._latest: dict[str, MigrationCounts] = {}  # replica id -> its counts, oldest first
        self._retired = MigrationCounts()

    def report(self, replica: str, counts: MigrationCounts) -> None:
        earlier = self._latest.pop(replica, None)
        self._latest[replica] = counts if earlier is None else earlier.at_least(counts)
        while len(self._latest) > MAX_REPLICAS:
            self._retired = self._retired.plus(self._latest.pop(next(iter(self._latest))))

    def summed(self) -> MigrationCounts:
        total = self._retired
        for counts in self._latest.values():
            total = total.plus(counts)
        return total

    def samples(self) -> dict[str, Any]:
        return self.summed().samples()
