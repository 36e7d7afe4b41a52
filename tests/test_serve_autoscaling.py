"""Both deployments' counts as Ray Serve runs them: the follow policy Serve calls (unit, with a
stand-in for Serve's context), the deployments' autoscaling configs, and a step load (1x, 4x,
1x) scaling the attention workers and the expert shards up and back down (e2e, real Serve)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cluster_harness import Cluster, Load, deploy, undeploy, wait_for

from zayaserve.cluster.control.autoscale_policy import WorkerSample
from zayaserve.cluster.control.serve_autoscaling import FollowTarget, serve_autoscaling_config
from zayaserve.replicas.cluster_messages import (
    SHARD_METRIC,
    WORKER_METRIC,
    AutoscalingReport,
    WorkerReport,
)
from zayaserve.replicas.engine.engine_stats import EngineStats


@dataclass
class _Ctx:
    """The fields of Serve's AutoscalingContext the policy reads."""

    target_num_replicas: int
    running_replicas: list[str]
    aggregated_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def test_a_worker_sample_reads_the_engine_stats() -> None:
    got = WorkerSample.from_engine(EngineStats(num_requests_waiting=3, num_requests_running=2,
                                               kv_blocks_free=25, kv_blocks_total=100))
    assert got == WorkerSample(waiting=3, running=2, kv_usage=0.75)
    assert WorkerSample.from_engine(EngineStats()).kv_usage == 0.0  # no blocks yet


def test_reports_name_what_serve_and_metrics_read() -> None:
    """The names Serve's policy reads are the ones replicas report; the worker's samples are
    the engine's fields under their own names, no remote-tier count without a remote tier."""
    assert AutoscalingReport(desired_workers=3).metrics() == {WORKER_METRIC: 3}
    assert AutoscalingReport(desired_shards=2, queue_rows=5).metrics() == {
        SHARD_METRIC: 2, "queue_rows": 5}
    assert AutoscalingReport().metrics() == {}
    samples = WorkerReport(EngineStats(kv_blocks_total=8), engine_steps=4).samples()
    assert samples["kv_blocks_total"] == 8 and samples["engine_steps_total"] == 4
    assert "prefix_cache_remote_writes" not in samples
    assert not any(k.startswith("router_") for k in samples)


def test_follow_policy_takes_the_largest_reported_count_of_running_replicas() -> None:
    policy = FollowTarget(SHARD_METRIC)
    assert policy(_Ctx(2, ["a", "b"])) == (2, {})  # nothing reported yet: keep the target
    assert policy(_Ctx(2, ["a", "b"], {SHARD_METRIC: {"a": 3.0, "b": 2.0}}))[0] == 3
    assert policy(_Ctx(3, ["a", "b"], {SHARD_METRIC: {"a": 2.5, "b": 2.0}}))[0] == 3
    assert policy(_Ctx(3, ["a"], {SHARD_METRIC: {"a": 2.0, "gone": 5.0}}))[0] == 2
    assert policy(_Ctx(3, ["a"], {WORKER_METRIC: {"a": 1.0}}))[0] == 3  # another metric


def test_serve_config_turns_serve_delays_off_and_names_the_policy() -> None:
    sc = serve_autoscaling_config(WORKER_METRIC, 5, (1, 3))
    assert (sc["min_replicas"], sc["max_replicas"], sc["initial_replicas"]) == (1, 3, 3)
    assert sc["upscale_delay_s"] == sc["downscale_delay_s"] == 0
    assert sc["policy"]["policy_function"].endswith(":FollowTarget")
    FollowTarget(**sc["policy"]["policy_kwargs"])  # the kwargs Serve will pass


# ---- e2e --------------------------------------------------------------------------------


def _running(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications["zayaserve"].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


@pytest.fixture(scope="module")
def scaling(ray_session: None) -> Iterator[Cluster]:
    # The shard pool follows the workers through the ratio: on this 2-core machine the
    # experts' rows/s barely move with load (the CPU is the bottleneck), so its own signals
    # (unit-tested in test_placement_controller) would not tell 1x from 4x here.
    limits = {"min": 1, "max": 2, "upscale_delay_s": 1, "downscale_delay_s": 3}
    cluster = deploy(expert_shards=1, engine={"max_num_seqs": 2},
                     autoscaling={"enabled": True, "attention_workers_per_shard": 1,
                                  "attention_workers": {**limits,
                                                        "target_waiting_per_worker": 1},
                                  "expert_shards": limits})
    yield cluster
    undeploy()


@pytest.mark.e2e
def test_step_load_scales_both_deployments_up_and_back_down(scaling: Cluster,
                                                             offline: dict) -> None:
    assert (_running("AttentionWorker"), _running("ExpertShard")) == (1, 1)
    with Load(scaling, offline, n=1) as light:
        time.sleep(8)
        steady = (_running("AttentionWorker"), _running("ExpertShard"))
        with Load(scaling, offline, n=4) as heavy:  # 1x + 4x: five streams, 2 fit a worker
            wait_for(lambda: _running("AttentionWorker") == 2 and _running("ExpertShard") == 2,
                     120, "both deployments scaled up")
        wait_for(lambda: _running("AttentionWorker") == 1 and _running("ExpertShard") == 1,
                 120, "both deployments back down at 1x")
    assert steady == (1, 1)
    assert not light.failures and not heavy.failures, (light.failures + heavy.failures)[:3]
