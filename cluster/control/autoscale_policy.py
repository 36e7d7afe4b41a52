"""What the application-level autoscaler decides: how many attention workers and expert shards.

`decide` is the pure half of a Ray Serve custom `autoscaling_policy`: the caller gathers each
replica's metrics, calls it with one `PolicyState` kept between calls and applies the counts it
returns. Nothing here imports Ray, so a metric trace can be replayed in a test.

- Attention workers want ceil(total waiting / target_waiting_per_worker); a mean KV usage above
  max_kv_usage, a p90 TTFT above max_ttft_s or a p90 inter-token latency above max_itl_s (each
  worker's p90 over its last 30 s, averaged over the workers with samples: the latency targets
  users state, as NVIDIA Dynamo's planner scales on) wants at least one more. A worker without
  a sample counts as idle (it just started): it dilutes the means.
- Expert shards want ceil(total queued rows / target_queue_per_shard) and, with
  max_rows_per_s_per_shard set, at least ceil(total rows/s / it).
- Down needs headroom: the load moved onto one replica fewer must stay within HEADROOM (70%) of
  every target (waiting or queued rows, rows/s, KV usage, TTFT), unless the pool is idle (nothing
  waiting, running or queued: the only way to zero). With fewer samples than replicas, never down.
- Hysteresis (`PoolMemory`): a change happens once its direction has been proposed at every call
  for upscale_delay_s or downscale_delay_s; another direction, a call that keeps the count, or a
  current count other than the clock's restarts the clock. Up jumps to the smallest count
  proposed in the window (the demand that lasted it: a ramp is not postponed by its own growth, a
  spike in it does not overshoot); down removes one replica per window (a shard's experts must
  move first). Each change starts the next window.
- Bounds are not load signals and apply at once: a count outside [min, max] is clamped; with
  attention_workers_per_shard set, the shards' floor is ceil(attention workers decided / ratio).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from zayaserve.cluster.control.elastic_config import (
    AttentionTargets,
    AutoscalingConfig,
    PoolLimits,
    ShardTargets,
)
from zayaserve.replicas.engine.engine_stats import EngineStats
from zayaserve.replicas.engine.latency_window import LatencyPercentiles

MIN_LATENCY_SAMPLES = 8  # fewer requests in a worker's window say nothing of its p90
HEADROOM = 0.7  # scale down only when one replica fewer would run at most 70% of each target


@dataclass(frozen=True)
class WorkerSample:
    """One attention worker's metrics: requests waiting and running, KV cache usage (0..1),
    and its recent p90 time to first token and inter-token latency (None: no sample lately)."""

    waiting: int
    running: int
    kv_usage: float
    ttft_s: float | None = None
    itl_s: float | None = None

    @classmethod
    def from_engine(cls, stats: EngineStats,
                    latency: LatencyPercentiles | None = None) -> WorkerSample:
        """From a worker's report to the placement controller."""
        ttft = latency.ttft_s if latency and latency.samples >= MIN_LATENCY_SAMPLES else None
        itl = latency.itl_s if latency and latency.itl_samples >= MIN_LATENCY_SAMPLES else None
        return cls(int(stats.num_requests_waiting), int(stats.num_requests_running),
                   stats.kv_usage, ttft, itl)


@dataclass(frozen=True)
class ShardSample:
    """One expert shard's metrics: token rows queued and rows computed per second."""

    queue_rows: float
    rows_per_s: float


@dataclass(frozen=True)
class Decision:
    """The counts to apply and, per pool, the signal and what hysteresis made of it."""

    attention_workers: int
    expert_shards: int
    reasons: tuple[str, ...]


@dataclass
class PoolMemory:
    """One pool's hysteresis clock: the direction proposed (+1, -1, 0: none) at every call since
    `since`, from `count` replicas; for up, the smallest count proposed in that window."""

    direction: int = 0
    since: float = 0.0
    count: int = -1
    smallest_up: int | None = None

    def begin(self, direction: int, now: float, count: int) -> None:
        self.direction, self.since, self.count, self.smallest_up = direction, now, count, None


@dataclass
class PolicyState:
    """What the policy remembers between calls: one clock per pool."""

    attention_workers: PoolMemory = field(default_factory=PoolMemory)
    expert_shards: PoolMemory = field(default_factory=PoolMemory)


Proposal = tuple[int, str]  # the count a pool's signals want, and why


def _up_or_down(name: str, n: int, reported: int, up: Proposal, fits_fewer: bool,
                load: str) -> Proposal:
    """`up` when it wants more; one fewer when the load fits it and every replica reported;
    else the current count."""
    if up[0] > n:
        return up
    if fits_fewer and n > 0:
        if reported < n:
            return n, f"{name}: {reported} of {n} replicas reported, not scaling down ({load})"
        return n - 1, f"{name}: load fits {n - 1} with headroom ({load})"
    return n, f"{name}: steady at {n} ({load})"


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _attention_proposal(t: AttentionTargets, n: int, samples: Sequence[WorkerSample]) -> Proposal:
    """Attention workers wanted by the waiting queue, KV usage and TTFT (module docstring)."""
    name = "attention_workers"
    waiting = sum(s.waiting for s in samples)
    running = sum(s.running for s in samples)
    kv_total = sum(s.kv_usage for s in samples)
    kv = kv_total / max(n, len(samples), 1)  # a worker without a sample is idle
    ttft = _mean([s.ttft_s for s in samples])
    itl = _mean([s.itl_s for s in samples])
    need = math.ceil(waiting / t.target_waiting_per_worker)
    up = (need, f"{name}: waiting {waiting} > {t.target_waiting_per_worker:g} per worker x {n}")
    if kv > t.max_kv_usage:
        up = (max(need, n + 1), f"{name}: kv usage {kv:.2f} > {t.max_kv_usage:g}")
    elif t.max_ttft_s is not None and ttft is not None and ttft > t.max_ttft_s:
        up = (max(need, n + 1), f"{name}: p90 ttft {ttft:.3f}s > {t.max_ttft_s:g}s")
    elif t.max_itl_s is not None and itl is not None and itl > t.max_itl_s:
        up = (max(need, n + 1), f"{name}: p90 itl {itl * 1e3:.1f}ms > {t.max_itl_s * 1e3:g}ms")
    fewer = n - 1  # an idle pool fits one fewer (zero included); a busy one needs headroom
    slo_ok = all(target is None or value is None or value <= HEADROOM * target
                 for target, value in ((t.max_ttft_s, ttft), (t.max_itl_s, itl)))
    fits = waiting + running == 0 or (fewer > 0 and slo_ok
                                      and waiting <= HEADROOM * t.target_waiting_per_worker * fewer
                                      and kv_total / fewer <= HEADROOM * t.max_kv_usage)
    load = f"waiting {waiting}, running {running}, kv {kv:.2f}"
    return _up_or_down(name, n, len(samples), up, fits, load)


def _shard_proposal(t: ShardTargets, n: int, samples: Sequence[ShardSample]) -> Proposal:
    """Expert shards wanted by the queued rows and the rows/s computed (module docstring)."""
    name = "expert_shards"
    rows = sum(s.queue_rows for s in samples)
    rate = sum(s.rows_per_s for s in samples)
    cap = t.max_rows_per_s_per_shard
    up: Proposal = (math.ceil(rows / t.target_queue_per_shard),
                    f"{name}: queue {rows:g} rows > {t.target_queue_per_shard:g} per shard x {n}")
    if cap is not None and math.ceil(rate / cap) > up[0]:
        up = (math.ceil(rate / cap), f"{name}: {rate:g} rows/s > {cap:g} per shard x {n}")
    fewer = n - 1  # an idle pool fits one fewer (zero included); a busy one needs headroom
    fits = rows == rate == 0 or (fewer > 0 and rows <= HEADROOM * t.target_queue_per_shard * fewer
                                 and (cap is None or rate <= HEADROOM * cap * fewer))
    load = f"queue {rows:g} rows, {rate:g} rows/s"
    return _up_or_down(name, n, len(samples), up, fits, load)


def _settle(name: str, limits: PoolLimits, n: int, proposal: Proposal, floor: int,
            memory: PoolMemory, now: float) -> tuple[int, list[str]]:
    """The count to apply now: bounds at once, load changes after their delay (module
    docstring). `floor` is the pool's lower bound (min, or more)."""
    (wanted, why), lo, hi = proposal, floor, limits.max
    if not lo <= n <= hi:
        to = min(max(n, lo), hi)
        memory.begin(0, now, to)
        return to, [why, f"{name}: {n} outside [{lo}, {hi}], set to {to}"]
    desired = min(max(wanted, lo), hi)
    reasons = [why] if desired == wanted else [why, f"{name}: limited to [{lo}, {hi}]"]
    if desired == n:
        memory.begin(0, now, n)
        return n, reasons
    direction = 1 if desired > n else -1
    if memory.direction != direction or memory.count != n:
        memory.begin(direction, now, n)
    if direction > 0:
        memory.smallest_up = min(memory.smallest_up or desired, desired)
    delay = limits.upscale_delay_s if direction > 0 else limits.downscale_delay_s
    waited = now - memory.since
    if waited < delay:
        return n, [*reasons, f"{name}: held at {n} until {delay:g}s of pressure ({waited:g}s)"]
    to = n - 1 if direction < 0 else memory.smallest_up or desired
    memory.begin(direction, now, to)
    return to, [*reasons, f"{name}: {n} -> {to} after {waited:g}s"]


def decide(config: AutoscalingConfig, current_workers: int, current_shards: int,
           workers: Sequence[WorkerSample], shards: Sequence[ShardSample], state: PolicyState,
           now: float) -> Decision:
    """The attention workers and expert shards to run, from one sample per reporting replica.

    The current counts are the deployments' targets (what was last decided), not the replicas
    already running; `state` carries the hysteresis between calls; `now`: monotonic seconds."""
    if not config.enabled:
        state.attention_workers.begin(0, now, current_workers)
        state.expert_shards.begin(0, now, current_shards)
        return Decision(current_workers, current_shards, ("autoscaling disabled",))
    aw, es = config.attention_workers, config.expert_shards
    attention = _attention_proposal(aw, current_workers, workers)
    n_workers, reasons = _settle("attention_workers", aw, current_workers, attention, aw.min,
                                 state.attention_workers, now)
    proposal, floor = _shard_proposal(es, current_shards, shards), es.min
    if (ratio := config.attention_workers_per_shard) is not None:
        floor = max(floor, min(math.ceil(n_workers / ratio), es.max))
        if floor > max(es.min, proposal[0]):
            reasons.append(f"expert_shards: at least {floor} for {n_workers} attention workers "
                           f"({ratio:g} per shard)")
    n_shards, shard_reasons = _settle("expert_shards", es, current_shards, proposal, floor,
                                      state.expert_shards, now)
    return Decision(n_workers, n_shards, (*reasons, *shard_reasons))
