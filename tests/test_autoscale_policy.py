"""The autoscaling policy's decisions: metric traces replayed through `decide` with one
PolicyState, each decision fed back as the next call's current counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from zayaserve.cluster.control.autoscale_policy import (
    Decision,
    PolicyState,
    ShardSample,
    WorkerSample,
    decide,
)
from zayaserve.cluster.control.elastic_config import (
    AttentionTargets,
    AutoscalingConfig,
    ShardTargets,
)


@dataclass(frozen=True)
class Load:
    """A pool-wide load at one instant, spread evenly over the replicas that report."""

    waiting: int = 0
    running: int = 0
    kv: float = 0.0  # total KV usage, in workers' worth (1.8: two workers at 0.9)
    ttft_s: float | None = None
    itl_s: float | None = None
    rows: float = 0.0
    rows_per_s: float = 0.0


Trace = list[tuple[float, Load]]
IDLE = Load()


def _config(workers: dict[str, Any] | None = None, shards: dict[str, Any] | None = None,
            **top: Any) -> AutoscalingConfig:
    aw = {"min": 1, "max": 8, "upscale_delay_s": 10, "downscale_delay_s": 30,
          "target_waiting_per_worker": 8, **(workers or {})}
    es = {"min": 1, "max": 4, "upscale_delay_s": 10, "downscale_delay_s": 30,
          "target_queue_per_shard": 64, **(shards or {})}
    return AutoscalingConfig(enabled=True, attention_workers=AttentionTargets(**aw),
                             expert_shards=ShardTargets(**es), **top)


def _trace(load_at: Callable[[float], Load], end: float = 300, step: float = 5) -> Trace:
    return [(float(t), load_at(float(t))) for t in range(0, int(end), int(step))]


def _worker_samples(load: Load, reporting: int) -> list[WorkerSample]:
    if reporting == 0:
        return []
    waiting, running = divmod(load.waiting, reporting), divmod(load.running, reporting)
    return [WorkerSample(waiting=waiting[0] + (i < waiting[1]),
                         running=running[0] + (i < running[1]),
                         kv_usage=load.kv / reporting, ttft_s=load.ttft_s, itl_s=load.itl_s)
            for i in range(reporting)]


def _shard_samples(load: Load, n: int) -> list[ShardSample]:
    return [ShardSample(load.rows / n, load.rows_per_s / n) for _ in range(n)]


def _replay(config: AutoscalingConfig, trace: Trace, workers: int = 1, shards: int = 1,
            reporting: int | None = None) -> list[tuple[float, Decision]]:
    """Each decision becomes the next call's current counts; `reporting` caps the workers that
    send a sample (the others just started)."""
    state, out = PolicyState(), []
    for now, load in trace:
        seen = workers if reporting is None else min(reporting, workers)
        d = decide(config, workers, shards, _worker_samples(load, seen),
                   _shard_samples(load, shards), state, now)
        out.append((now, d))
        workers, shards = d.attention_workers, d.expert_shards
    return out


def _changes(out: list[tuple[float, Decision]], workers: int = 1,
             shards: int = 1) -> list[tuple[float, int, int]]:
    seen = []
    for now, d in out:
        if (d.attention_workers, d.expert_shards) != (workers, shards):
            workers, shards = d.attention_workers, d.expert_shards
            seen.append((now, workers, shards))
    return seen


def _reasons_at(out: list[tuple[float, Decision]], when: float) -> tuple[str, ...]:
    return next(d.reasons for now, d in out if now == when)


def test_step_load_scales_up_after_the_delay_and_down_one_by_one() -> None:
    # 1x: 5 waiting, 32 rows queued; 4x from t=20 to t=100. Shards: no up delay, 45 s down.
    def load_at(t: float) -> Load:
        x = 4 if 20 <= t < 100 else 1
        return Load(waiting=5 * x, running=4, kv=0.3, rows=32 * x)

    out = _replay(_config(shards={"upscale_delay_s": 0, "downscale_delay_s": 45}),
                  _trace(load_at))
    assert _changes(out) == [(20, 1, 2), (30, 3, 2), (130, 2, 2), (145, 2, 1), (160, 1, 1)]
    assert "attention_workers: held at 1 until 10s of pressure (5s)" in _reasons_at(out, 25)
    assert "attention_workers: 1 -> 3 after 10s" in _reasons_at(out, 30)
    assert "attention_workers: held at 2 until 30s of pressure (25s)" in _reasons_at(out, 155)
    assert out[-1][1].attention_workers == 1  # 5 waiting on one worker: no idle, no zero


def test_brief_spike_shorter_than_the_delay_changes_nothing() -> None:
    out = _replay(_config(), _trace(lambda t: Load(waiting=200 if t in (20, 25) else 5)))
    assert _changes(out) == []
    assert "attention_workers: held at 1 until 10s of pressure (5s)" in _reasons_at(out, 25)


def test_scale_up_takes_the_demand_that_lasted_the_whole_delay() -> None:
    # Need 3 from t=20 with a spike needing 10 at t=25: up to 3, not 10.
    spike = _replay(_config(), _trace(lambda t: Load(waiting=80 if t == 25 else 20 * (t >= 20))))
    assert _changes(spike)[0] == (30, 3, 1)
    # A ramp (3, 4, 5 workers' worth) is not postponed by its own growth.
    ramp = _replay(_config(), _trace(lambda t: Load(waiting=20 + int(t * 1.6))))
    assert _changes(ramp)[0] == (10, 3, 1)


@pytest.mark.parametrize(("load", "after"), [
    (Load(waiting=7, running=2), (2, 1)),  # 7 waiting fit one worker (8), not with headroom
    (Load(waiting=5, running=2), (1, 1)),
    (Load(running=8, kv=0.7), (2, 1)),  # 0.7 KV on one worker: over 0.85 x 0.7
    (Load(running=8, kv=0.5), (1, 1)),
    (Load(running=8, rows=50), (1, 2)),  # 50 rows fit one shard (64), not with headroom
    (Load(running=8, rows=40), (1, 1)),
])
def test_scale_down_needs_headroom(load: Load, after: tuple[int, int]) -> None:
    out = _replay(_config(), _trace(lambda t: load, end=600), workers=2, shards=2)
    assert (out[-1][1].attention_workers, out[-1][1].expert_shards) == after


@pytest.mark.parametrize("quiet", [Load(waiting=5), Load(waiting=10)])
def test_flapping_load_never_scales(quiet: Load) -> None:
    # 2 workers; every 5 s the load swings between needing 3 and fitting 1 (or needing 2).
    out = _replay(_config(), _trace(lambda t: Load(waiting=20) if t % 10 else quiet, end=600),
                  workers=2)
    assert _changes(out, workers=2) == []
    assert any("held at 2" in r for _, d in out for r in d.reasons)


def test_counts_are_clamped_to_min_and_max() -> None:
    out = _replay(_config(), _trace(lambda t: Load(waiting=1000)))
    assert _changes(out) == [(10, 8, 1)]
    assert "attention_workers: limited to [1, 8]" in _reasons_at(out, 10)
    idle = _replay(_config(workers={"min": 2}, shards={"min": 2}), _trace(lambda t: IDLE),
                   workers=4, shards=4)
    assert _changes(idle, 4, 4) == [(30, 3, 3), (60, 2, 2)]
    # A count outside the bounds is brought into them at once.
    d = decide(_config(workers={"min": 2}), 12, 0, [], [], PolicyState(), 0.0)
    assert (d.attention_workers, d.expert_shards) == (8, 1)
    assert "attention_workers: 12 outside [2, 8], set to 8" in d.reasons


def test_kv_pressure_alone_scales_attention_up() -> None:
    out = _replay(_config(), _trace(lambda t: Load(running=40, kv=1.8)), workers=2)
    assert _changes(out, workers=2) == [(10, 3, 1)]  # then 0.6 each, too busy for 2
    assert "attention_workers: kv usage 0.90 > 0.85" in _reasons_at(out, 0)
    slow = _replay(_config(workers={"max_ttft_s": 2}),
                   _trace(lambda t: Load(running=8, kv=0.4, ttft_s=3.0), end=15), workers=2)
    assert _changes(slow, workers=2) == [(10, 3, 1)]
    assert "attention_workers: p90 ttft 3.000s > 2s" in _reasons_at(slow, 0)


def test_latency_targets_scale_up_and_hold_down_within_headroom() -> None:
    """TTFT and ITL above target add workers with a low queue and KV; down only below 70%."""
    cfg = _config(workers={"max_ttft_s": 0.5, "max_itl_s": 0.05, "downscale_delay_s": 10})

    def load(ttft: float, itl: float) -> Trace:
        return _trace(lambda t: Load(running=4, kv=0.2, ttft_s=ttft, itl_s=itl), end=60)

    assert _changes(_replay(cfg, load(0.8, 0.01), workers=2), workers=2)[0] == (10, 3, 1)
    itl = _replay(cfg, load(0.1, 0.08), workers=2)
    assert _changes(itl, workers=2)[0] == (10, 3, 1)
    assert "attention_workers: p90 itl 80.0ms > 50ms" in _reasons_at(itl, 0)
    # Within target but above 70% of it: neither up nor down.
    assert _changes(_replay(cfg, load(0.4, 0.01), workers=2), workers=2) == []
    assert _changes(_replay(cfg, load(0.1, 0.04), workers=2), workers=2) == []
    # Well under both: one worker fewer per delay, down to the load's need.
    assert _changes(_replay(cfg, load(0.1, 0.01), workers=2), workers=2)[0] == (10, 1, 1)
    # No latency samples (nothing finished lately): the targets say nothing.
    quiet = _trace(lambda t: Load(running=4, kv=0.2), end=60)
    plain = _config(workers={"downscale_delay_s": 10})
    assert _changes(_replay(cfg, quiet, workers=2), workers=2) == _changes(
        _replay(plain, quiet, workers=2), workers=2)


def test_worker_sample_takes_the_reported_percentiles() -> None:
    from zayaserve.replicas.engine.engine_stats import EngineStats
    from zayaserve.replicas.engine.latency_window import LatencyWindow

    window = LatencyWindow(window_s=30)
    for i in range(100):
        window.add_ttft(0.01 * (i + 1), now=float(i % 10))
        window.add_itl(0.001 * (i + 1), now=float(i % 10))
    p = window.percentiles(0.9, now=10.0)
    assert (p.ttft_s, p.itl_s, p.samples) == (0.9, 0.09, 100)
    sample = WorkerSample.from_engine(EngineStats(num_requests_running=3), p)
    assert (sample.ttft_s, sample.itl_s, sample.running) == (0.9, 0.09, 3)
    assert window.percentiles(0.9, now=45.0).ttft_s is None  # all older than the window
    assert WorkerSample.from_engine(EngineStats()).ttft_s is None
    thin = LatencyWindow()
    for _ in range(3):  # a few slow requests are not a p90
        thin.add_ttft(5.0, now=1.0)
        thin.add_itl(1.0, now=1.0)
    few = WorkerSample.from_engine(EngineStats(), thin.percentiles(0.9, now=2.0))
    assert (few.ttft_s, few.itl_s) == (None, None)


def test_missing_samples_never_scale_down_and_count_as_idle() -> None:
    out = _replay(_config(), _trace(lambda t: IDLE, end=600), workers=4, reporting=2)
    assert _changes(out, workers=4) == []
    assert any(r.startswith("attention_workers: 2 of 4 replicas reported, not scaling down")
               for r in _reasons_at(out, 100))
    everyone = _replay(_config(), _trace(lambda t: IDLE, end=600), workers=4)
    assert [w for _, w, _ in _changes(everyone, workers=4)] == [3, 2, 1]
    # Two of four workers at 0.95 KV: the two starting ones are idle, the mean is under 0.85.
    hot = _replay(_config(), _trace(lambda t: Load(kv=1.9, running=8)), workers=4, reporting=2)
    assert _changes(hot, workers=4) == []


def test_shards_follow_queued_rows_and_rows_per_second() -> None:
    cfg = _config(shards={"upscale_delay_s": 0, "max_rows_per_s_per_shard": 1000})
    d = decide(cfg, 1, 1, [], [ShardSample(100, 500), ShardSample(100, 500)], PolicyState(), 0)
    assert d.expert_shards == 4  # ceil(200 rows / 64)
    d = decide(cfg, 1, 1, [], [ShardSample(10, 1500), ShardSample(10, 1500)], PolicyState(), 0)
    assert d.expert_shards == 3  # ceil(3000 rows/s / 1000)
    assert "expert_shards: 3000 rows/s > 1000 per shard x 1" in d.reasons


def test_ratio_floor_keeps_a_shard_per_so_many_workers() -> None:
    cfg = _config(shards={"upscale_delay_s": 60}, attention_workers_per_shard=2)
    d = decide(cfg, 6, 1, _worker_samples(IDLE, 6), [ShardSample(0, 0)], PolicyState(), 0)
    assert d.expert_shards == 3  # at once: a floor is not a load signal
    assert "expert_shards: at least 3 for 6 attention workers (2 per shard)" in d.reasons
    # Workers scaled up by load take the shards along in the same decision.
    out = _replay(cfg, _trace(lambda t: Load(waiting=36, running=8)))
    assert _changes(out) == [(10, 5, 3)]
    # Idle shards come down to the floor, not below.
    idle = _replay(_config(workers={"min": 4}, attention_workers_per_shard=2),
                   _trace(lambda t: Load(running=8)), workers=4, shards=4)
    assert _changes(idle, 4, 4) == [(30, 4, 3), (60, 4, 2)]


def test_disabled_returns_the_current_counts() -> None:
    cfg = _config().model_copy(update={"enabled": False})
    out = _replay(cfg, _trace(lambda t: Load(waiting=1000, kv=3.0, rows=10_000)),
                  workers=2, shards=3)
    assert _changes(out, 2, 3) == []
    assert all(d.reasons == ("autoscaling disabled",) for _, d in out)


def test_reasons_name_the_signal() -> None:
    cfg = _config(workers={"target_waiting_per_worker": 4})
    d = decide(cfg, 3, 2, _worker_samples(Load(waiting=40), 3), _shard_samples(IDLE, 2),
               PolicyState(), 0)
    assert (d.attention_workers, d.expert_shards) == (3, 2)
    assert "attention_workers: waiting 40 > 4 per worker x 3" in d.reasons
    assert "attention_workers: held at 3 until 10s of pressure (0s)" in d.reasons
    assert "expert_shards: load fits 1 with headroom (queue 0 rows, 0 rows/s)" in d.reasons
