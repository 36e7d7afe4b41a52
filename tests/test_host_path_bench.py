"""The host-path benchmark's simulated device (bench/sim_device.py) and its paths: the device
model matches ZAYA1-8B's bytes, and every path of `bench/host_path.py` yields the same tokens
(no timing is asserted: the figures are the benchmark's to print)."""

from __future__ import annotations

import pytest

from zayaserve.bench import host_path
from zayaserve.bench.sim_device import BANDWIDTH, SimulatedDevice, StepCost
from zayaserve.replicas.model.builtin.presets import count_params


def test_step_cost_counts_zaya1_8b() -> None:
    cost = StepCost.zaya1_8b()
    total = cost.dense + cost.expert * cost.num_layers * cost.num_experts
    assert total == pytest.approx(2 * count_params("zaya1-8b"))  # bf16: every parameter once
    assert 7.5e9 < total / 2 < 9.5e9
    # Batch 1 routes one token per layer; from batch 16 on nearly every expert is read.
    assert cost.distinct_experts(1) == pytest.approx(16 / 17)
    assert cost.distinct_experts(64) > 15.5
    device = SimulatedDevice("h100")
    one, big = device.seconds(1, 1, 64), device.seconds(64, 64, 64)
    assert 0.5e-3 < one < 1.0e-3 and 4.5e-3 < big < 6e-3
    assert SimulatedDevice("mi300x").seconds(64, 64, 64) == pytest.approx(
        big * BANDWIDTH["h100"] / BANDWIDTH["mi300x"])
    with pytest.raises(ValueError, match="preset"):
        SimulatedDevice("tpu")


def test_every_path_yields_the_same_tokens() -> None:
    sync = host_path.run_offline(6, "h100", async_scheduling=False)
    fast = host_path.run_offline(6, "h100", async_scheduling=True)
    served = host_path.run_async_engine(6, "h100")
    assert sync["tokens"] == fast["tokens"] == served["tokens"]
    assert len({tuple(t) for t in sync["tokens"]}) == 6
    for r in (sync, fast, served):
        assert r["steps"] == host_path.GEN_LEN and 0 < r["busy"] <= 1.0
