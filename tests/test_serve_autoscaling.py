"""The attention workers' autoscaling as Ray Serve runs it: the policy class Serve calls
(unit, with a stand-in for Serve's context), and the deployment scaling up under a queue and
back down when idle (e2e, real Ray Serve)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from cluster_harness import Cluster, deploy, undeploy

from zayaserve.cluster.config import ClusterConfig
from zayaserve.cluster.serve_autoscaling import (
    METRICS,
    AttentionWorkerPolicy,
    serve_autoscaling_config,
)
from zayaserve.replicas.attention_worker import autoscaling_metrics


@dataclass
class _Ctx:
    """The fields of Serve's AutoscalingContext the policy reads."""

    target_num_replicas: int
    running_replicas: list[str]
    aggregated_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def _ctx(target: int, waiting: list[float], kv: float = 0.1) -> _Ctx:
    names = [f"r{i}" for i in range(len(waiting))]
    return _Ctx(target, names, {
        "waiting": dict(zip(names, waiting, strict=True)),
        "running": {n: 1.0 for n in names}, "kv_usage": {n: kv for n in names}})


def test_the_worker_reports_what_the_policy_reads() -> None:
    got = autoscaling_metrics({"num_requests_waiting": 3, "num_requests_running": 2,
                               "kv_blocks_free": 25, "kv_blocks_total": 100})
    assert tuple(got) == METRICS and got == {"waiting": 3, "running": 2, "kv_usage": 0.75}


def test_policy_scales_up_after_the_delay_and_down_one_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    policy = AttentionWorkerPolicy(min=1, max=3, upscale_delay_s=2, downscale_delay_s=5,
                                   target_waiting_per_worker=2)
    seen = []
    target = 1
    for t, waiting in [(0, [9]), (1, [9]), (2.5, [9]), (3, [5, 0, 0]), (4, [0, 0, 0]),
                       (9.5, [0, 0, 0]), (15, [0, 0])]:
        clock[0] = 100.0 + t
        target, state = policy(_ctx(target, waiting))
        assert state == {}
        seen.append(target)
    assert seen == [1, 1, 3, 3, 3, 2, 1], (seen, policy.last_reasons)


def test_serve_config_turns_serve_delays_off_and_names_the_policy() -> None:
    cfg = ClusterConfig.create(autoscaling={"enabled": True, "min": 1, "max": 3},
                               attention_workers=5)
    sc = serve_autoscaling_config(cfg.autoscaling, cfg.attention_workers)
    assert (sc["min_replicas"], sc["max_replicas"], sc["initial_replicas"]) == (1, 3, 3)
    assert sc["upscale_delay_s"] == sc["downscale_delay_s"] == 0
    assert sc["policy"]["policy_function"].endswith(":AttentionWorkerPolicy")
    AttentionWorkerPolicy(**sc["policy"]["policy_kwargs"])  # the kwargs Serve will pass
    with pytest.raises(ValueError, match="autoscaling"):
        ClusterConfig.create(autoscaling={"enabled": True, "min": 3, "max": 2})


# ---- e2e --------------------------------------------------------------------------------


def _workers(cluster: Cluster) -> int:
    from ray import serve

    status = serve.status().applications["zayaserve"].deployments["AttentionWorker"]
    return int(status.replica_states.get("RUNNING", 0))


@pytest.fixture(scope="module")
def scaling(ray_session: None) -> Iterator[Cluster]:
    cluster = deploy(expert_shards=0, engine={"max_num_seqs": 2},
                     autoscaling={"enabled": True, "min": 1, "max": 2, "upscale_delay_s": 1,
                                  "downscale_delay_s": 3, "target_waiting_per_worker": 1})
    yield cluster
    undeploy()


@pytest.mark.e2e
def test_step_load_scales_the_workers_up_and_back_down(scaling: Cluster) -> None:
    assert _workers(scaling) == 1
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    def client() -> None:
        while not stop.is_set():
            r = httpx.post(scaling.base + "/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": "hello", "max_tokens": 48, "ignore_eos": True})
            if r.status_code != 200:
                failures.append(r.text)
            done[0] += 1

    threads = [threading.Thread(target=client) for _ in range(8)]  # 4x what 2 seqs serve
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 90
        while _workers(scaling) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _workers(scaling) == 2, "no scale-up under a queue of 6"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not failures and done[0] > 0, failures[:3]
    deadline = time.monotonic() + 90
    while _workers(scaling) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _workers(scaling) == 1, "no scale-down once idle"
