"""The placement controller: which shard slot holds which experts, where each live shard listens,
and a version that changes whenever that does.

Shard replicas are interchangeable Serve replicas; each claims a free slot at start-up (so a
restarted replica takes over the experts of the one it replaces), registers its gRPC address
when its experts are loaded, and heartbeats. A slot whose holder stops heartbeating is vacated
and the map's version moves on; attention workers poll the version and pick up the new map
without a restart. The map is plain data (expert -> ordered shard list), so later work can move
or replicate experts by publishing a new one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ray import serve

from zayaserve.cluster.expert_load import ExpertLoad
from zayaserve.router.placement import compute_placement


@dataclass(slots=True)
class _Holder:
    replica: str
    address: str | None
    last_seen: float


class PlacementState:
    """The controller's logic, free of Serve so it can be unit tested."""

    def __init__(self, num_experts: int, num_shards: int, replication: int,
                 heartbeat_timeout_s: float = 4.0) -> None:
        self.num_experts = num_experts
        self.slots = [f"shard-{i}" for i in range(num_shards)]
        # No shards (experts inside the workers): the controller only gathers worker stats.
        self.assignment = (compute_placement(num_experts, self.slots, replication)
                           if num_shards else {})
        self.timeout = heartbeat_timeout_s
        self.holders: dict[str, _Holder] = {}
        self.version = 0
        self.worker_stats: dict[str, tuple[float, dict[str, Any]]] = {}
        self.shard_stats: dict[str, dict[str, Any]] = {}
        self.load = ExpertLoad(num_experts)

    def _expire(self, now: float) -> None:
        dead = [s for s, h in self.holders.items() if now - h.last_seen > self.timeout]
        for slot in dead:
            del self.holders[slot]
            self.shard_stats.pop(slot, None)
            self.load.forget(slot)
        if dead:
            self.version += 1

    def claim(self, replica: str, now: float | None = None) -> tuple[str, list[int]]:
        now = time.monotonic() if now is None else now
        self._expire(now)
        for slot, holder in self.holders.items():
            if holder.replica == replica:
                return slot, self.assignment[slot]
        for slot in self.slots:
            if slot not in self.holders:
                self.holders[slot] = _Holder(replica, None, now)
                return slot, self.assignment[slot]
        raise RuntimeError(f"expert_shards: all {len(self.slots)} slots are held; "
                           f"replica {replica} has nothing to serve")

    def register(self, replica: str, slot: str, address: str, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        self.holders[slot] = _Holder(replica, address, now)
        self.version += 1
        return self.version

    def heartbeat(self, replica: str, slot: str, stats: dict[str, Any] | None = None,
                  now: float | None = None) -> bool:
        """False tells the replica its slot was given away (it should re-claim)."""
        now = time.monotonic() if now is None else now
        holder = self.holders.get(slot)
        if holder is None or holder.replica != replica:
            return False
        holder.last_seen = now
        if stats is not None:
            self.shard_stats[slot] = stats
            tokens = stats.get("tokens")
            if isinstance(tokens, dict):
                self.load.add(slot, replica, tokens, now)
        return True

    def placement(self, now: float | None = None) -> dict[str, Any]:
        self._expire(time.monotonic() if now is None else now)
        live = {s: h.address for s, h in self.holders.items() if h.address}
        replicas = {e: [s for s in self.slots if s in live and e in self.assignment[s]]
                    for e in range(self.num_experts)}
        return {"version": self.version, "num_experts": self.num_experts,
                "replicas": replicas, "addresses": live,
                "assignment": dict(self.assignment)}

    def view(self, now: float | None = None) -> dict[str, Any]:
        """What GET /v1/cluster/placement shows: the map's version (epoch), each shard slot
        (serving, starting: claimed and loading, or vacant), per-expert load, balancedness."""
        now = time.monotonic() if now is None else now
        current = self.placement(now)
        shards = []
        for slot in self.slots:
            holder = self.holders.get(slot)
            state = "vacant" if holder is None else "serving" if holder.address else "starting"
            shards.append({"id": slot, "state": state, "experts": self.assignment[slot],
                           "address": holder.address if holder else None})
        return {"epoch": current["version"], "num_experts": self.num_experts,
                "experts_in_workers": not self.slots, "shards": shards,
                "balancedness": self.load.balancedness(current["replicas"],
                                                       list(current["addresses"])),
                **self.load.view()}

    def report_worker(self, replica: str, stats: dict[str, Any]) -> None:
        self.worker_stats[replica] = (time.monotonic(), stats)

    def stats(self) -> dict[str, Any]:
        """Sums the numeric stats of workers seen in the last minute, plus shard counters."""
        now = time.monotonic()
        total: dict[str, Any] = {}
        for seen, stats in self.worker_stats.values():
            if now - seen < 60:
                for k, v in stats.items():
                    if isinstance(v, int | float):
                        total[k] = total.get(k, 0) + v
        total["expert_shards_live"] = sum(1 for h in self.holders.values() if h.address)
        total["placement_version"] = self.version
        # Labelled samples (the metrics front end's shape): tokens each shard served per expert.
        total["expert_tokens_total"] = [
            {"shard": slot, "layer": int(key.split(":")[0]), "expert": int(key.split(":")[1]),
             "value": n}
            for slot, stats in sorted(self.shard_stats.items())
            for key, n in sorted(stats.get("tokens", {}).items())]
        return total


@serve.deployment(max_ongoing_requests=1000)
class PlacementController:
    def __init__(self, num_experts: int, num_shards: int, replication: int) -> None:
        self.state = PlacementState(num_experts, num_shards, replication)

    def claim(self, replica: str) -> tuple[str, list[int]]:
        return self.state.claim(replica)

    def register(self, replica: str, slot: str, address: str) -> int:
        return self.state.register(replica, slot, address)

    def heartbeat(self, replica: str, slot: str, stats: dict[str, Any] | None = None) -> bool:
        return self.state.heartbeat(replica, slot, stats)

    def placement(self) -> dict[str, Any]:
        return self.state.placement()

    def view(self) -> dict[str, Any]:
        return self.state.view()

    def report_worker(self, replica: str, stats: dict[str, Any]) -> None:
        self.state.report_worker(replica, stats)

    def stats(self) -> dict[str, Any]:
        return self.state.stats()
