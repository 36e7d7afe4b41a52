"""The elastic cluster's settings: `eplb:` in the cluster config, and the bounds a resize (by
hand or by the autoscaler) keeps each deployment within."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from zayaserve.cluster.control.autoscale_policy import AutoscalingConfig


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
