"""Prefix-aware request routing across attention workers (a Ray Serve request router).

Each attention worker keeps its own L1 prefix cache, so a request should go to the worker that
already computed the longest prefix of its prompt. The router remembers, per chained block
hash of the prompts it routed, which replica got them (an LRU-bounded table); a new request
goes to the replica owning its longest remembered prefix, unless that replica's queue is longer
than the least loaded one's by more than `imbalanced_threshold`, in which case load wins. A
replica's load is its queue as Serve counts it plus the calls its RSA runs hold beyond the one
request each run is to Serve.
Requests with no remembered prefix go to the least loaded replica.

Used as `request_router_class="zayaserve.replicas.serve_request_router.PrefixAwareRequestRouter"`;
the routed call's positional args are `(request_id, prompt_token_ids, ...)`
(AttentionWorker.generate).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import xxhash
from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from zayaserve.replicas.routing_stats import RoutingStats


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of the prompt's full blocks (routing only, never a cache key)."""
    out, prev = [], b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = b"".join(int(t).to_bytes(4, "little") for t in token_ids[start:start + block_size])
        prev = xxhash.xxh3_128_digest(prev + block)
        out.append(prev)
    return out


class PrefixTable:
    """Block-hash -> replica, LRU-bounded; the routing logic without Serve, for unit tests."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._owner: OrderedDict[bytes, Any] = OrderedDict()

    def longest(self, hashes: list[bytes], candidates: set[Any]) -> tuple[Any, int]:
        """(replica, matched blocks) of the longest remembered prefix held by a candidate.

        A chained hash names its whole prefix, so the deepest remembered block decides, even
        when shallower entries were overwritten or forgotten."""
        for i in range(len(hashes) - 1, -1, -1):
            owner = self._owner.get(hashes[i])
            if owner is not None and owner in candidates:
                return owner, i + 1
        return None, 0

    def record(self, hashes: list[bytes], replica: Any) -> None:
        for h in hashes:
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def forget(self, replica: Any) -> None:
        for h in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[h]


def _extra_calls(replica: RunningReplica) -> int:
    """Engine calls Serve does not see: each RSA run is one request to Serve, but its round
    holds up to n calls in the engine (AttentionWorker.record_routing_stats)."""
    return RoutingStats.from_metrics(getattr(replica, "routing_stats", None)).extra_calls


class PrefixAwareRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, block_size: int = 16, imbalanced_threshold: int = 8,
                         max_entries: int = 100_000, **_: Any) -> None:
        self._block_size = block_size
        self._threshold = imbalanced_threshold
        self._table = PrefixTable(max_entries)
        self.prefix_routed = 0

    def _hashes(self, pending: PendingRequest | None) -> list[bytes]:
        args: Sequence[Any] = getattr(pending, "args", None) or ()
        if len(args) < 2 or not isinstance(args[1], list | tuple):
            return []
        return prompt_block_hashes(args[1], self._block_size)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        probed = await self._probe_queue_lens(candidate_replicas, 0)
        loads = {r.replica_id: (q if q is not None else 1 << 30) + _extra_calls(r)
                 for r, q in probed}
        by_load = sorted(candidate_replicas, key=lambda r: loads.get(r.replica_id, 1 << 30))
        owner, depth = self._table.longest(self._hashes(pending_request),
                                           {r.replica_id for r in candidate_replicas})
        if owner is not None and depth > 0:
            lightest = loads.get(by_load[0].replica_id, 0)
            if loads.get(owner, 1 << 30) - lightest <= self._threshold:
                self.prefix_routed += 1
                first = [r for r in candidate_replicas if r.replica_id == owner]
                return [first] + [[r] for r in by_load if r.replica_id != owner]
        return [[r] for r in by_load]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        self._table.record(self._hashes(pending_request), replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._table.forget(replica_id)
        super().on_replica_actor_died(replica_id)
