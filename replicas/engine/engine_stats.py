"""The engine's numbers: `LLM.stats()` offline, and in serving what each attention worker reports
to the placement controller (`replicas/cluster_messages.WorkerReport`), whose sums /metrics
exports (the cumulative ones as counters: see `cluster/control/worker_totals`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zayaserve.replicas.engine.scheduler import Scheduler
from zayaserve.replicas.kv_tiers.remote_tier import RemoteTier


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Gauges (running, waiting, KV blocks) and cumulative counts (preemptions, prefix-cache
    tokens looked up and found per tier: local L1, remote L2). The field names are the
    offline `LLM.stats()` keys and the /metrics family names."""

    num_requests_running: float = 0.0
    num_requests_waiting: float = 0.0
    num_preemptions: float = 0.0
    kv_blocks_free: float = 0.0
    kv_blocks_total: float = 0.0
    prefix_cache_cached_blocks: float = 0.0
    prefix_cache_local_hit_tokens: float = 0.0
    prefix_cache_local_queried_tokens: float = 0.0
    prefix_cache_remote_hit_tokens: float = 0.0
    prefix_cache_remote_queried_tokens: float = 0.0
    prefix_cache_remote_rejected_blocks: float = 0.0
    prefix_cache_remote_errors: float = 0.0
    prefix_cache_remote_writes: float | None = None  # None: no remote tier

    @property
    def kv_usage(self) -> float:
        """The fraction of KV blocks in use (0 with no blocks)."""
        total = self.kv_blocks_total
        return 1.0 - self.kv_blocks_free / total if total else 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def engine_stats(s: Scheduler, remote: RemoteTier | None) -> EngineStats:
    kv = s.kv
    local = dict(
        num_requests_running=float(len(s.running)),
        num_requests_waiting=float(len(s.waiting)),
        num_preemptions=float(s.num_preemptions),
        kv_blocks_free=float(s.blocks.num_free),
        kv_blocks_total=float(s.blocks.num_blocks),
        prefix_cache_cached_blocks=float(s.blocks.num_cached),
        prefix_cache_local_hit_tokens=float(kv.prefix_hit_tokens),
        prefix_cache_local_queried_tokens=float(kv.prefix_queried_tokens),
        prefix_cache_remote_queried_tokens=float(kv.remote_queried_tokens))
    if remote is None:
        return EngineStats(**local)
    return EngineStats(
        **local,
        prefix_cache_remote_hit_tokens=float(remote.stats.hit_tokens),
        prefix_cache_remote_rejected_blocks=float(remote.stats.rejected_blocks),
        prefix_cache_remote_errors=float(remote.store.stats.errors),
        prefix_cache_remote_writes=float(remote.store.stats.writes))
