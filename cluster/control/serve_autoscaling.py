"""How Ray Serve is told the replica counts the placement controller decides.

Both deployments run with an `autoscaling_config` whose policy only *follows*: the controller
(resize operations, and the autoscaler when on) decides how many attention workers and expert
shards to run; every replica learns the number from its regular exchange with the controller
and reports it through Serve's `record_autoscaling_stats`; `FollowTarget` hands it to Serve.
Serve changes the deployment in place, so every other replica keeps running (redeploying the
application with a new count would restart all of them).

Serve removes replicas of its own choosing on a downscale, which is why the controller only
lowers the shard count once every expert has enough copies elsewhere (`scale_ops`).
"""

from __future__ import annotations

import math
from typing import Any

POLICY = "zayaserve.cluster.control.serve_autoscaling:FollowTarget"


def serve_autoscaling_config(metric: str, initial: int, bounds: tuple[int, int]
                             ) -> dict[str, Any]:
    """A deployment's `autoscaling_config`: Serve's delays off (the controller's rule), the
    replicas' numbers read every half second."""
    lo, hi = bounds
    return {"min_replicas": lo, "max_replicas": hi,
            "initial_replicas": min(max(initial, lo), hi),
            "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
            "metrics_interval_s": 0.5, "look_back_period_s": 1.0,
            "policy": {"policy_function": POLICY, "policy_kwargs": {"metric": metric}}}


class FollowTarget:
    """Serve's custom policy: the count the replicas report under `metric` (the largest, as
    a replica that has not heard the newest number yet reports the older one for at most a
    second). No reports yet: keep the current target."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        reported = (ctx.aggregated_metrics or {}).get(self.metric, {})
        values = [v for r, v in reported.items() if r in set(ctx.running_replicas)
                  and v is not None]
        if not values:
            return ctx.target_num_replicas, {}
        return math.ceil(max(values) - 1e-6), {}
