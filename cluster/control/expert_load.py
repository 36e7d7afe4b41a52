"""Per-expert load as the placement controller sees it: each shard heartbeats its cumulative
token counts per (layer, expert); from two heartbeats of the same replica comes its rate per
expert (tokens/s, all layers), averaged over time (an EWMA with time constant `window_s`, so
heartbeats need not be regular or aligned across shards). An expert's load is the sum of its
replicas' rates. The load, and the balancedness it gives the current placement, are what
`GET /v1/cluster/placement` shows and what EPLB plans from.

Skip tokens never reach a shard, so this is the expert pool's own load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zayaserve.cluster.control.eplb import balancedness, shard_loads


@dataclass(slots=True)
class _ShardRate:
    replica: str
    time: float
    counts: list[int]  # cumulative, per expert
    rate: list[float]  # tokens/s, per expert
    seeded: bool = False


class ExpertLoad:
    """Shard heartbeats' cumulative counts -> tokens/s per expert, time-averaged."""

    def __init__(self, num_experts: int, window_s: float = 30.0) -> None:
        self.num_experts = num_experts
        self.window_s = window_s
        self._shards: dict[str, _ShardRate] = {}

    def _per_expert(self, tokens: Mapping[tuple[int, int], int]) -> list[int]:
        counts = [0] * self.num_experts
        for (_, expert), count in tokens.items():
            if 0 <= expert < self.num_experts:
                counts[expert] += int(count)
        return counts

    def add(self, slot: str, replica: str, tokens: Mapping[tuple[int, int], int],
            now: float) -> None:
        """A shard's cumulative counts ((layer, expert) -> tokens). The first heartbeat of a
        replica is its baseline (its counts cover an unknown time since it started)."""
        counts = self._per_expert(tokens)
        prev = self._shards.get(slot)
        if prev is None or prev.replica != replica:
            self._shards[slot] = _ShardRate(replica, now, counts, [0.0] * self.num_experts)
            return
        dt = now - prev.time
        if dt <= 0:
            return
        rate = [max(0, c - p) / dt for c, p in zip(counts, prev.counts, strict=True)]
        if prev.seeded:
            a = 1.0 - math.exp(-dt / self.window_s)
            rate = [a * r + (1.0 - a) * m for r, m in zip(rate, prev.rate, strict=True)]
        prev.time, prev.counts, prev.rate, prev.seeded = now, counts, rate, True

    def forget(self, slot: str) -> None:
        self._shards.pop(slot, None)

    def slot_rate(self, slot: str) -> float:
        """Tokens/s one shard computes (all its experts)."""
        shard = self._shards.get(slot)
        return sum(shard.rate) if shard else 0.0

    def load(self) -> list[float]:
        """Tokens/s per expert over every shard heard from."""
        total = [0.0] * self.num_experts
        for shard in self._shards.values():
            total = [t + r for t, r in zip(total, shard.rate, strict=True)]
        return total

    def balancedness(self, replicas: Mapping[int, Sequence[str]],
                     shards: Sequence[str]) -> float | None:
        """Mean / max shard load of a placement under the current load (None: no shards)."""
        if not shards:
            return None
        held = {e: [s for s in r if s in shards] for e, r in replicas.items()}
        return balancedness(shard_loads(self.load(), {e: r for e, r in held.items() if r},
                                        shards))

    def view(self) -> dict[str, Any]:
        return {"expert_load": [round(x, 3) for x in self.load()],
                "load_window_s": self.window_s}
