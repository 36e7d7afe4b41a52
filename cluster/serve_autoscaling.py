"""Autoscaling the attention workers through Ray Serve: each replica records its load
(its engine's queue and KV usage, through Serve's `record_autoscaling_stats`), and
Serve calls `AttentionWorkerPolicy` with every replica's latest numbers; the decision itself
is `autoscale_policy.decide` (hysteresis, headroom, bounds), so Serve's own delays are zero.

Expert shards keep their configured count: changing it needs the two-phase resize (experts
must be held elsewhere before a shard goes), which Serve's replica removal cannot provide.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from zayaserve.cluster.autoscale_policy import (
    AttentionTargets,
    AutoscalingConfig,
    PolicyState,
    ShardTargets,
    WorkerSample,
    decide,
)

POLICY = "zayaserve.cluster.serve_autoscaling:AttentionWorkerPolicy"
# What AttentionWorker.record_autoscaling_stats reports (replicas.attention_worker's
# `autoscaling_metrics`), read here by name.
METRICS = ("waiting", "running", "kv_usage")


class WorkerAutoscaling(AttentionTargets):
    """`autoscaling:` in the cluster config: attention workers between min and max."""

    enabled: bool = Field(default=False, description="Scale the attention workers on load.")


def serve_autoscaling_config(settings: WorkerAutoscaling, initial: int) -> dict[str, Any]:
    """The AttentionWorker deployment's `autoscaling_config` (Serve's delays off: ours rule)."""
    return {"min_replicas": settings.min, "max_replicas": settings.max,
            "initial_replicas": min(max(initial, settings.min), settings.max),
            "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
            # Each replica's latest numbers, averaged over a short window: the delays are ours.
            "metrics_interval_s": 0.5, "look_back_period_s": 2.0,
            "policy": {"policy_function": POLICY,
                       "policy_kwargs": settings.model_dump(exclude={"enabled"})}}


class AttentionWorkerPolicy:
    """Serve's custom policy for the AttentionWorker deployment (one instance per controller,
    so its hysteresis state lives here)."""

    def __init__(self, **targets: Any) -> None:
        self.config = AutoscalingConfig(enabled=True,
                                        attention_workers=AttentionTargets(**targets),
                                        expert_shards=ShardTargets(min=0, max=0))
        self.state = PolicyState()
        self.last_reasons: tuple[str, ...] = ()

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics: dict[str, dict[Any, float]] = ctx.aggregated_metrics or {}
        samples = []
        for replica in ctx.running_replicas:
            values = [metrics.get(name, {}).get(replica) for name in METRICS]
            if values[0] is None:
                continue  # no numbers from it yet: it counts as idle
            waiting, running, kv = (float(v or 0.0) for v in values)
            samples.append(WorkerSample(int(waiting), int(running), kv, None))
        decision = decide(self.config, ctx.target_num_replicas, 0, samples, [], self.state,
                          time.monotonic())
        self.last_reasons = decision.reasons
        return decision.attention_workers, {}
