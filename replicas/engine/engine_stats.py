"""The engine's numbers for `LLM.stats()` and, in serving, /metrics (where the cumulative ones
become counters: see `cluster.metrics`)."""

from __future__ import annotations

from zayaserve.replicas.engine.scheduler import Scheduler
from zayaserve.replicas.kv_tiers.remote_tier import RemoteTier


def engine_stats(s: Scheduler, remote: RemoteTier | None) -> dict[str, float]:
    """Gauges (running, waiting, KV blocks) and cumulative counts (preemptions, prefix-cache
    tokens looked up and found per tier: local L1, remote L2)."""
    kv = s.kv
    stats = {"num_requests_running": float(len(s.running)),
             "num_requests_waiting": float(len(s.waiting)),
             "num_preemptions": float(s.num_preemptions),
             "kv_blocks_free": float(s.blocks.num_free),
             "kv_blocks_total": float(s.blocks.num_blocks),
             "prefix_cache_cached_blocks": float(s.blocks.num_cached),
             "prefix_cache_local_hit_tokens": float(kv.prefix_hit_tokens),
             "prefix_cache_local_queried_tokens": float(kv.prefix_queried_tokens),
             "prefix_cache_remote_hit_tokens": 0.0,
             "prefix_cache_remote_queried_tokens": float(kv.remote_queried_tokens),
             "prefix_cache_remote_rejected_blocks": 0.0,
             "prefix_cache_remote_errors": 0.0}
    if remote is not None:
        stats["prefix_cache_remote_hit_tokens"] = float(remote.stats.hit_tokens)
        stats["prefix_cache_remote_rejected_blocks"] = float(remote.stats.rejected_blocks)
        stats["prefix_cache_remote_errors"] = float(remote.store.stats.errors)
        stats["prefix_cache_remote_writes"] = float(remote.store.stats.writes)
    return stats
