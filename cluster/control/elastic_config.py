"""The elastic cluster's settings: `autoscaling:` and `eplb:` in the cluster config, and the
bounds a resize (by hand or by the autoscaler) keeps each deployment within. What the
autoscaler does with them is `autoscale_policy`; EPLB's planning is `eplb`."""

from __future__ import annotations

import math
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PoolLimits(BaseModel):
    """One deployment's bounds and how long pressure must last before it changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: int = Field(default=1, ge=0, description="Fewest replicas.")
    max: int = Field(default=4, ge=0, description="Most replicas.")
    upscale_delay_s: float = Field(default=10.0, ge=0, description="Pressure held to scale up.")
    downscale_delay_s: float = Field(default=60.0, ge=0, description="Slack held per step down.")

    @model_validator(mode="after")
    def _check_bounds(self) -> Self:
        if self.max < self.min:
            raise ValueError(f"max: must be >= min ({self.min}), got {self.max}")
        return self


class AttentionTargets(PoolLimits):
    """Attention workers: their bounds and the load one worker should carry."""

    target_waiting_per_worker: float = Field(default=4.0, gt=0, description="Waiting per worker.")
    max_kv_usage: float = Field(default=0.85, gt=0, le=1, description="Mean KV cache usage (0..1).")
    max_ttft_s: float | None = Field(
        default=None, gt=0, description="p90 time to first token (s), mean over workers.")
    max_itl_s: float | None = Field(
        default=None, gt=0, description="p90 inter-token latency (s), mean over workers.")


class ShardTargets(PoolLimits):
    """Expert shards: their bounds and the load one shard should carry."""

    target_queue_per_shard: float = Field(default=64.0, gt=0, description="Rows queued/shard.")
    max_rows_per_s_per_shard: float | None = Field(default=None, gt=0, description="Rows/s/shard.")


class AutoscalingConfig(BaseModel):
    """Both pools' limits; off unless `enabled`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    attention_workers: AttentionTargets = AttentionTargets()  # frozen: sharing one is safe
    expert_shards: ShardTargets = ShardTargets()
    attention_workers_per_shard: float | None = Field(
        default=None, gt=0, description="At least one expert shard per this many attention "
        "workers: shards >= ceil(attention workers / this).")

    @model_validator(mode="after")
    def _check_ratio(self) -> Self:
        ratio, top = self.attention_workers_per_shard, self.attention_workers.max
        if ratio is not None and (need := math.ceil(top / ratio)) > self.expert_shards.max:
            raise ValueError(f"attention_workers_per_shard: {ratio:g} needs {need} shards at "
                             f"attention_workers.max ({top}), above expert_shards.max "
                             f"({self.expert_shards.max})")
        return self


class EplbConfig(BaseModel):
    """Expert-parallel load balancing: replicate hot experts from their observed load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="Re-place experts by observed load.")
    window_s: float = Field(
        default=30.0, gt=0, description="Time constant of the per-expert load average "
        "(tokens/s from the shards' counts, skip tokens excluded: they cost the pool nothing).")
    interval_s: float = Field(default=10.0, gt=0, description="How often a rebalance is weighed.")
    redundant_experts: int = Field(
        default=0, ge=0, description="Extra expert copies the hottest experts get.")
    min_gain: float = Field(
        default=0.05, ge=0, description="Balancedness gain (0..1) a rebalance must bring.")
    move_cost: float = Field(
        default=0.005, ge=0, description="Balancedness gain each expert copy moved must pay for.")


def pool_bounds(autoscaling: AutoscalingConfig, attention_workers: int, expert_shards: int,
                replication: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((min, max) expert shards, (min, max) attention workers) a resize may ask for: the
    autoscaling limits, widened to hold the deployed counts, never below what serving needs."""
    es, aw = autoscaling.expert_shards, autoscaling.attention_workers
    shards = (max(es.min, replication, 1), max(es.max, expert_shards, replication))
    workers = (max(aw.min, 1), max(aw.max, attention_workers, 1))
    return shards, workers
