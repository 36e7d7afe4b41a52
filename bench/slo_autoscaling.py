"""Latency-target autoscaling on a step load, simulated: SLO attainment and replica-seconds of
the real autoscaling policy (`decide`, fed what workers report: waiting, running, KV usage and
their recent p90 TTFT and ITL from `LatencyWindow`) against a fixed deployment sized for the
peak, and against the same policy without latency targets (queues and KV only).

Simulation, labelled as such: no engine runs. Each attention worker is a continuous batcher
whose step takes `BASE_MS + PER_SEQ_MS x sequences + PER_PREFILL_TOKEN_MS x prompt tokens`
(a 5 ms step, as the host-path benchmarks simulate an H100), with chunked prefill; a new
worker serves `startup_s` after the decision; a removed one drains (takes nothing new, leaves
when empty). Arrivals are Poisson at a rate that steps from a base to a peak and back.

    python -m zayaserve.bench.slo_autoscaling [--seconds 1800] [--ttft 1.0] [--itl 0.015]
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from typing import Any

from zayaserve.cluster.control.autoscale_policy import PolicyState, WorkerSample, decide
from zayaserve.cluster.control.elastic_config import AttentionTargets, AutoscalingConfig
from zayaserve.replicas.engine.latency_window import LatencyWindow, percentile

BASE_MS, PER_SEQ_MS, PER_PREFILL_TOKEN_MS = 5.0, 0.12, 0.02
MAX_SEQS, PREFILL_BUDGET = 64, 2048  # per worker: sequences running, prompt tokens per step
PROMPT, OUTPUT = 1024, 256  # tokens per request
TICK_S = 0.005


@dataclass
class _Req:
    arrival: float
    prefill_left: int = PROMPT
    out_left: int = OUTPUT
    first: float | None = None
    done: float | None = None


@dataclass
class _Worker:
    ready_at: float
    draining: bool = False
    waiting: list[_Req] = field(default_factory=list)
    running: list[_Req] = field(default_factory=list)
    busy_until: float = 0.0
    window: LatencyWindow = field(default_factory=lambda: LatencyWindow(window_s=30.0))

    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    def step(self, now: float) -> None:
        while self.waiting and len(self.running) < MAX_SEQS:
            self.running.append(self.waiting.pop(0))
        if not self.running or now < self.busy_until:
            return
        budget, prefill = PREFILL_BUDGET, 0
        decoding = [r for r in self.running if r.prefill_left == 0]
        for r in self.running:
            if r.prefill_left and budget:
                take = min(budget, r.prefill_left)
                r.prefill_left -= take
                budget -= take
                prefill += take
        end = now + (BASE_MS + PER_SEQ_MS * len(self.running)
                     + PER_PREFILL_TOKEN_MS * prefill) / 1e3
        self.busy_until = end
        for r in self.running:
            if r.prefill_left == 0 and r.first is None:
                r.first = end
                self.window.add_ttft(end - r.arrival, end)
        for r in decoding:
            r.out_left -= 1
            if r.out_left == 0:
                r.done = end
                assert r.first is not None
                self.window.add_itl((end - r.first) / OUTPUT, end)
        self.running = [r for r in self.running if r.done is None]

    def sample(self, now: float) -> WorkerSample:
        p = self.window.percentiles(0.9, now)
        return WorkerSample(len(self.waiting), len(self.running),
                            len(self.running) / MAX_SEQS, p.ttft_s, p.itl_s)


@dataclass
class Result:
    name: str
    finished: int
    slo_met: float  # fraction of finished requests within both targets
    ttft_p90: float
    itl_p90: float
    replica_s: float
    most_workers: int


def _rate(t: float, seconds: float, base: float, peak: float) -> float:
    """Requests/s: base, then peak over the middle third, then base again."""
    return peak if seconds / 3 <= t < 2 * seconds / 3 else base


def run(name: str, seconds: float, base: float, peak: float, seed: int,
        targets: tuple[float, float], fixed: int | None = None,
        config: AutoscalingConfig | None = None, startup_s: float = 20.0) -> Result:
    """One deployment over the trace; `targets`: (TTFT s, ITL s) a request must meet."""
    rng = random.Random(seed)
    workers = [_Worker(0.0) for _ in range(fixed or 1)]
    state, replica_s, most = PolicyState(), 0.0, len(workers)
    served: list[_Req] = []
    next_arrival, t, next_decision = rng.expovariate(base), 0.0, 1.0
    while t < seconds:
        t += TICK_S
        while next_arrival <= t:
            live = [w for w in workers if w.ready_at <= t and not w.draining]
            target = min(live or workers, key=_Worker.load)
            target.waiting.append(_Req(next_arrival))
            next_arrival += rng.expovariate(_rate(next_arrival, seconds, base, peak))
        for w in workers:
            if w.ready_at <= t:
                before = w.running[:]
                w.step(t)
                served.extend(r for r in before if r.done is not None)
        workers = [w for w in workers if not (w.draining and not w.load())]
        replica_s += TICK_S * len(workers)
        most = max(most, len(workers))
        if config is not None and t >= next_decision:
            next_decision += 1.0
            active = [w for w in workers if not w.draining]
            if any(w.ready_at > t for w in active):
                continue  # as the controller: no decision while a resize is under way
            samples = [w.sample(t) for w in active if w.ready_at <= t]
            d = decide(config, len(active), 0, samples, [], state, t)
            for _ in range(d.attention_workers - len(active)):
                workers.append(_Worker(t + startup_s))
            for w in sorted(active, key=_Worker.load)[:max(0, len(active) - d.attention_workers)]:
                w.draining = True
                for r in w.waiting:  # not started: sent to another worker
                    min((x for x in workers if not x.draining), key=_Worker.load).waiting.append(r)
                w.waiting = []
    return _result(name, served, replica_s, most, targets)


def _result(name: str, served: list[_Req], replica_s: float, most: int,
            targets: tuple[float, float]) -> Result:
    ttft = [r.first - r.arrival for r in served if r.first is not None]
    itl = [(r.done - r.first) / OUTPUT for r in served  # OUTPUT tokens after the first
           if r.done is not None and r.first is not None]
    met = sum(1 for a, b in zip(ttft, itl, strict=True) if a <= targets[0] and b <= targets[1])
    return Result(name, len(served), met / max(1, len(served)), percentile(ttft, 0.9) or 0.0,
                  percentile(itl, 0.9) or 0.0, replica_s, most)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1800.0)
    ap.add_argument("--base", type=float, default=5.0, help="requests/s off peak")
    ap.add_argument("--peak", type=float, default=30.0, help="requests/s at the peak")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ttft", type=float, default=1.0, help="target p90 TTFT, s")
    ap.add_argument("--itl", type=float, default=0.015, help="target p90 ITL, s")
    args = ap.parse_args(argv)
    limits: dict[str, Any] = {"min": 1, "max": 8, "upscale_delay_s": 5, "downscale_delay_s": 30,
              "target_waiting_per_worker": 16}
    slo = AutoscalingConfig(enabled=True, attention_workers=AttentionTargets(
        **limits, max_ttft_s=args.ttft, max_itl_s=args.itl))
    queues = AutoscalingConfig(enabled=True, attention_workers=AttentionTargets(**limits))
    common = (args.seconds, args.base, args.peak, args.seed, (args.ttft, args.itl))
    fixed = next(r for n in range(1, 9)
                 if (r := run(f"fixed {n} (sized for the peak)", *common, fixed=n)).slo_met
                 >= 0.99)
    rows = [fixed, run("autoscaled, latency targets", *common, config=slo),
            run("autoscaled, queues and KV only", *common, config=queues)]
    print(f"simulation: {args.seconds:g} s, {args.base:g} -> {args.peak:g} -> {args.base:g} "
          f"req/s, {PROMPT}+{OUTPUT} tokens, targets TTFT {args.ttft:g} s and ITL "
          f"{args.itl * 1e3:g} ms per request")
    print("| deployment | requests | within both targets | p90 TTFT s | p90 ITL ms | "
          "replica-s | vs fixed | most workers |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.finished} | {r.slo_met:.1%} | {r.ttft_p90:.2f} | "
              f"{r.itl_p90 * 1e3:.1f} | {r.replica_s:.0f} | "
              f"{r.replica_s / fixed.replica_s:.2f}x | {r.most_workers} |")


if __name__ == "__main__":
    main()
