"""The placement controller at scale, simulated: what it costs to serve 10 to 1,000 attention
workers and 16 to 256 expert shards, reporting at their real rates.

Simulation, not a cluster: the real `PlacementController` deployment class (its
`ControllerState` inside, and the metrics front end's renderer) runs in this process on a
simulated clock; every message crosses a pickle round trip as Ray
would ship it (the controller unpickles reports and pickles answers, and that is counted). What
is not counted: Ray's own per-call cost (an actor call costs about 100-300 µs of the caller's
and the callee's CPU on top, more at 1,000 callers), and the event loop's scheduling.

Per scale it prints:
- controller CPU per simulated second (the fraction of one core the controller needs);
- the controller's memory (tracemalloc, everything it retains);
- the placement map's pickled size and the bytes per second its distribution costs;
- a resize's time from decision to a committed epoch (simulated seconds: heartbeats and the
  grace set it, not CPU);
- /metrics: the summed stats' size as Prometheus text, and the time to build and render it.

    python -m zayaserve.bench.control_plane [--seconds 10] [--scales 10x16,100x64,1000x256]
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import random
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from zayaserve.cluster.control.controller_state import ControllerState
from zayaserve.cluster.control.controller_store import MemoryControllerStore
from zayaserve.cluster.control.placement_controller import PlacementController
from zayaserve.cluster.frontend.metrics import MetricsCollector
from zayaserve.replicas.attention_worker import POLL_S
from zayaserve.replicas.cluster_messages import ShardReport, WorkerReport
from zayaserve.replicas.engine.engine_stats import EngineStats
from zayaserve.router.router_stats import LayerLatency, RouterStats, ShardLatency

LAYERS, EXPERTS = 40, 16  # ZAYA1-8B's MoE layers and experts per layer
REPORT_S, HEARTBEAT_S, TICK_S = 1.0, 1.0, 0.25  # worker stats, shard heartbeats, ticks


def _worker_report(rng: random.Random, shards: list[str]) -> bytes:
    """A busy worker's report, pickled: its engine, its router, and a round-trip histogram
    with samples for every shard it called."""
    latency = ShardLatency()
    for shard in shards:
        for _ in range(3):
            latency.observe(shard, rng.uniform(0.0004, 0.02))
    engine = EngineStats(num_requests_running=rng.randint(1, 64), kv_blocks_total=4096,
                         kv_blocks_free=rng.randint(0, 4096), num_preemptions=rng.randint(0, 9))
    router = RouterStats(dispatches=10**6, calls=10**7, rows_sent=10**8,
                         layer_latency={i: LayerLatency(100, 0.5, 0.01, 0.004)
                                        for i in range(LAYERS)})
    return pickle.dumps(WorkerReport(engine, 10**5, router, latency.histogram()))


def _shard_report(held: list[int], rng: random.Random) -> bytes:
    tokens = {(layer, e): rng.randint(0, 10**6) for layer in range(LAYERS) for e in held}
    return pickle.dumps(ShardReport(tuple(held), rng.randint(0, 64), 64, tokens))


@dataclass
class Scale:
    workers: int
    shards: int
    cpu_per_s: float = 0.0
    baseline_cpu_per_s: float = 0.0  # the same, every poll answered with the whole map
    map_sent_per_s: float = 0.0
    memory_mb: float = 0.0
    map_bytes: int = 0
    commit_s: float | None = None
    metrics_bytes: int = 0
    scrape_ms: float = 0.0


def _call(coro: Coroutine[Any, Any, Any]) -> Any:
    """Runs one of the controller's coroutines (none of them awaits anything) to its answer."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the controller awaited something: drive it on an event loop")


def _controller(workers: int, shards: int) -> Any:
    """The PlacementController deployment's class, constructed as Serve does, on a store in
    memory; its own tick task is stopped (the simulation ticks it)."""
    cls: Any = PlacementController.func_or_class  # type: ignore[attr-defined]

    async def build() -> Any:
        ctl = cls.__new__(cls)
        room = {"expert_shards": {"max": 2 * shards}, "attention_workers": {"max": 2 * workers}}
        await ctl.__init__(EXPERTS, shards, max(1, shards // EXPERTS), workers, room,
                           store=MemoryControllerStore())
        ctl._tick.cancel()
        return ctl

    return asyncio.run(build())


class Simulation:
    """The controller, its shards (each heartbeats what it was told to hold) and workers
    (each reports and polls the map, passing the order of the one it holds)."""

    def __init__(self, workers: int, shards: int, seed: int = 0,
                 versioned: bool = True) -> None:
        """`versioned` False: the baseline, every poll answered with the whole map."""
        rng = random.Random(seed)
        self.versioned = versioned
        self.now = 0.0
        self.ctl = _controller(workers, shards)
        self.ctl.clock = lambda: self.now
        self.state: ControllerState = self.ctl.state
        self.held: dict[str, list[int]] = {}
        self.replicas: dict[str, str] = {}
        self.shard_bytes: dict[str, bytes] = {}
        for i in range(shards):
            self.start_shard(f"r{i}")
        slots = list(self.held)
        self.worker_bytes = [_worker_report(rng, slots) for _ in range(workers)]
        self.known: list[tuple[int, int] | None] = [None] * workers  # each worker's map order
        self.map_sends = 0  # answers that carried a map

    def start_shard(self, replica: str) -> None:
        slot, hold = _call(self.ctl.claim(replica))
        _call(self.ctl.register(replica, slot, f"10.0.0.{len(self.held)}:50051", hold))
        self.held[slot], self.replicas[slot] = hold, replica
        self.shard_bytes[slot] = _shard_report(hold, random.Random(len(self.held)))

    def advance(self, dt: float) -> None:
        """`dt` simulated seconds in ticks; every sender spread evenly over its period."""
        for _ in range(round(dt / TICK_S)):
            self.now += TICK_S
            self.ctl.tick(self.now)
            self._due(len(self.worker_bytes), REPORT_S, self._report)
            self._due(len(self.worker_bytes), POLL_S, self._poll)
            self._due(len(self.held), HEARTBEAT_S, self._beat)

    def _due(self, n: int, period: float, send: Callable[[int], None]) -> None:
        per_tick = n * TICK_S / period
        start = int(self.now / TICK_S * per_tick) % max(n, 1)
        for k in range(int(round(per_tick))):
            send((start + k) % n)

    def _report(self, i: int) -> None:
        report = pickle.loads(self.worker_bytes[i])
        pickle.dumps(_call(self.ctl.report_worker(f"w{i}", report)))

    def _poll(self, i: int) -> None:
        update = _call(self.ctl.placement(self.known[i] if self.versioned else None))
        pickle.dumps(update)
        if update is not None:
            self.known[i] = update.order
            self.map_sends += 1

    def _beat(self, i: int) -> None:
        slot = list(self.held)[i]
        report: ShardReport = pickle.loads(self.shard_bytes[slot])
        report = ShardReport(tuple(self.held[slot]), report.queue_rows, report.capacity_experts,
                             report.tokens)
        answer = _call(self.ctl.heartbeat(self.replicas[slot], slot, report))
        self.held[slot] = list(answer.hold)  # loaded by the next beat
        pickle.dumps(answer)

    def map_bytes(self) -> int:
        return len(pickle.dumps(_call(self.ctl.placement())))

    def resize_commit_s(self) -> float | None:
        """Simulated seconds from a one-shard scale-up decision to its committed epoch."""
        before = self.state.placement.epoch
        start = self.now
        answer = _call(self.ctl.scale(expert_shards=len(self.held) + 1))
        assert "operation" in answer, answer
        self.start_shard(f"r-new{len(self.held)}")
        while self.now - start < 60:
            self.advance(TICK_S)
            if self.state.placement.epoch > before and not self.state.ops.busy():
                return self.now - start
        return None

    def scrape(self) -> tuple[int, float]:
        """The ingress's /metrics: the controller's summed stats, shipped, rendered."""
        t0 = time.perf_counter()
        stats = pickle.loads(pickle.dumps(_call(self.ctl.stats())))
        metrics = MetricsCollector()
        metrics.update_engine_stats(stats)
        text = metrics.render()
        return len(text), (time.perf_counter() - t0) * 1e3


def _cpu_per_s(sim: Simulation, seconds: float) -> float:
    sim.advance(2.0)  # every sender heard from once; the first load baseline
    sim.map_sends = 0  # from here on: steady state
    t0 = time.process_time()
    sim.advance(seconds)
    return (time.process_time() - t0) / seconds


def measure(workers: int, shards: int, seconds: float) -> Scale:
    out = Scale(workers, shards)
    out.baseline_cpu_per_s = _cpu_per_s(Simulation(workers, shards, versioned=False), seconds)
    sim = Simulation(workers, shards)
    out.cpu_per_s = _cpu_per_s(sim, seconds)
    out.map_bytes = sim.map_bytes()
    out.map_sent_per_s = sim.map_sends * out.map_bytes / seconds
    out.metrics_bytes, out.scrape_ms = sim.scrape()
    out.commit_s = sim.resize_commit_s()
    tracemalloc.start()
    small = Simulation(workers, shards)
    small.advance(2.0)
    out.memory_mb = tracemalloc.get_traced_memory()[0] / 2**20 - sum(
        len(b) for b in small.worker_bytes + list(small.shard_bytes.values())) / 2**20
    tracemalloc.stop()
    return out


def _row(s: Scale) -> str:
    full = s.map_bytes * s.workers / POLL_S
    commit = "-" if s.commit_s is None else f"{s.commit_s:.2f}"
    return (f"| {s.workers} | {s.shards} | {s.cpu_per_s:.3f} | {s.baseline_cpu_per_s:.3f} | "
            f"{s.baseline_cpu_per_s / max(s.cpu_per_s, 1e-9):.1f}x | {s.memory_mb:.1f} | "
            f"{s.map_bytes / 1e3:.1f} | {s.map_sent_per_s / 1e3:.1f} | {full / 1e6:.2f} | "
            f"{commit} | {s.metrics_bytes / 1e3:.0f} | {s.scrape_ms:.0f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="simulated seconds measured")
    ap.add_argument("--scales", default="10x16,100x64,1000x256", help="WORKERSxSHARDS,...")
    args = ap.parse_args(argv)
    print("simulation: the real PlacementController on a simulated clock; Ray's call cost "
          "excluded")
    print("| workers | shards | controller CPU (cores) | baseline: full-map polls | ratio | "
          "memory MB | map kB | map kB/s sent | full maps MB/s | resize to commit (sim s) | "
          "/metrics kB | scrape ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[Any] = []
    for scale in args.scales.split(","):
        w, s = (int(x) for x in scale.split("x"))
        rows.append(measure(w, s, args.seconds))
        print(_row(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
