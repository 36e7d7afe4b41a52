"""What tracing costs: serving throughput with tracing off, on at 10% sampling and on at 100%,
measured in one run, and the off path's per-step cost.

Two settings, each interleaving the three modes round by round (rotating their order) with
the same seeded streaming workload; a round's ratios to "off" pair modes measured moments
apart, and the figures are medians over rounds:

* in one process (default): expert shards over real gRPC, the engine with two micro-batches
  behind the token router, the OpenAI REST app (`inprocess_cluster`). Tracing is per process,
  so it is switched between rounds; little else runs, so the noise is low.
* `--serve`: a local Ray Serve cluster, one application per mode side by side (two expert
  shards each, own route prefix). Closer to production, but on a small machine its rounds
  scatter by +-15%.

Traces go to a real OTLP/gRPC receiver in a process of its own (`otlp_sink`), so exporting
costs what it costs and receiving costs the measured process nothing. "Off" is then compared
with no tracing code at all by timing the hooks the serving path runs when tracing is off
against the measured step time.

    python -m zayaserve.bench.tracing [--model small] [--streams 16] [--rounds 12] [--serve]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import time
import timeit
from collections.abc import Sequence
from typing import Any

from zayaserve.bench.local_services import free_port
from zayaserve.bench.serve import _drive

MODES = (("off", None), ("10%", 0.1), ("100%", 1.0))


def deploy_modes(args: argparse.Namespace, endpoint: str) -> None:
    from ray import serve

    from zayaserve.cluster.app import build_app
    from zayaserve.cluster.config import ClusterConfig
    from zayaserve.cluster.serve_cli import serve_logging

    quiet = serve_logging("warning")  # no access logs: they would cost CPU in every mode
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port},
                logging_config=quiet)
    for name, ratio in MODES:
        tracing = ({"disabled": True} if ratio is None else
                   {"otlp_traces_endpoint": endpoint, "sampler": "parentbased_traceidratio",
                    "sampler_arg": ratio})
        cfg = ClusterConfig.create(
            model=args.model, http_port=args.http_port, grpc_port=0, replica_num_cpus=0.1,
            expert_shards=2, tracing=tracing,
            engine={"max_num_seqs": args.streams, "num_threads": args.threads})
        serve.run(build_app(cfg), name=_app(name), route_prefix=f"/{_app(name)}",
                  logging_config=quiet)
        ctl = serve.get_deployment_handle("PlacementController", app_name=_app(name))
        while len(ctl.placement.remote().result().addresses) < 2:
            time.sleep(0.5)


def _app(mode: str) -> str:
    return "tracing-" + mode.replace("%", "pct")


def off_path_cost(steps: int = 20000) -> dict[str, float]:
    """Seconds per call of each hook the serving path runs with tracing off."""
    from zayaserve.replicas.engine.params import SamplingParams
    from zayaserve.replicas.engine.request_timeline import RequestTimeline
    from zayaserve.replicas.observability import tracing
    from zayaserve.replicas.observability.dispatch_tracing import (
        dispatch_group,
        end_step,
        set_step_requests,
        trace_metadata,
        tracing_on,
    )

    assert tracing.tracer() is None
    timelines = [RequestTimeline() for _ in range(16)]
    params = SamplingParams()

    def step() -> None:  # what the runner does around a micro-batch's forward
        set_step_requests(timelines)
        end_step()

    def per_request() -> None:
        t = RequestTimeline.begin("r", 100, params, None)
        t.on_scheduled()
        t.on_prefill_chunk(0, 100)
        t.on_tokens()
        t.finish([1], ["length"])

    def time_of(fn: Any) -> float:
        return min(timeit.repeat(fn, number=steps, repeat=5)) / steps

    return {"runner hooks (per micro-batch step)": time_of(step),
            "dispatch_group (per dispatch)": time_of(lambda: dispatch_group(3)),
            "trace_metadata (per shard call)": time_of(trace_metadata),
            "tracing_on (per shard call, in the shard)": time_of(tracing_on),
            "request timeline (per request)": time_of(per_request),
            "on_tokens (per request per step)": time_of(timelines[0].on_tokens)}


class Rounds:
    """Tokens/s per mode per round, and engine steps per mode (for the step time)."""

    def __init__(self) -> None:
        self.rates: dict[str, list[float]] = {name: [] for name, _ in MODES}
        self.cpu: dict[str, list[float]] = {name: [] for name, _ in MODES}  # s per token
        self.seconds: dict[str, float] = {name: 0.0 for name, _ in MODES}
        self.steps: dict[str, float] = {name: 0.0 for name, _ in MODES}

    def add(self, r: int, name: str, seconds: float, tokens: int, steps: float,
            cpu_s: float | None = None) -> None:
        if r < 0:  # the warm-up round
            return
        self.rates[name].append(tokens / seconds)
        self.seconds[name] += seconds
        self.steps[name] += steps
        cpu = ""
        if cpu_s is not None:
            self.cpu[name].append(cpu_s / tokens)
            cpu = f"  {cpu_s / tokens * 1e3:6.2f} CPU ms/token"
        print(f"round {r} {name:>5}: {tokens / seconds:7.1f} tok/s{cpu}", flush=True)

    def report(self, title: str, spans: int) -> float:
        """Prints medians and paired ratios; returns the step time with tracing off (s)."""
        print(f"\n{title} (median tok/s, min-max; ratio to off: median of the rounds' ratios)")
        off = self.rates["off"]
        for name, _ in MODES:
            v = self.rates[name]
            ratios = [a / b for a, b in zip(v, off, strict=True)]
            print(f"  tracing {name:>5}: {statistics.median(v):7.1f}  ({min(v):.1f}-"
                  f"{max(v):.1f})  ratio {statistics.median(ratios):.3f}  "
                  f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")
        if self.cpu["off"]:
            print("  CPU time of the serving process per generated token (all its threads):")
            for name, _ in MODES:
                ratios = [a / b for a, b in zip(self.cpu[name], self.cpu["off"], strict=True)]
                print(f"  tracing {name:>5}: {statistics.median(self.cpu[name]) * 1e3:6.2f} ms"
                      f"  ratio {statistics.median(ratios):.3f}  (rounds {min(ratios):.3f}-"
                      f"{max(ratios):.3f})")
        print(f"  spans received: {spans}")
        return self.seconds["off"] / max(1.0, self.steps["off"])


def _order(r: int) -> list[str]:
    names = [name for name, _ in MODES]
    return names[r % len(names):] + names[:r % len(names)]


def run_in_process(args: argparse.Namespace, prompts: list[list[int]], endpoint: str,
                   spans: Any) -> float:
    from zayaserve.bench.inprocess_cluster import InProcessCluster
    from zayaserve.replicas.observability import tracing
    from zayaserve.replicas.observability.tracing import TracingConfig

    cluster = InProcessCluster(args.model, max_num_seqs=args.streams,
                               num_threads=args.threads)
    rounds = Rounds()
    try:
        for r in range(-1, args.rounds):  # round -1 warms every mode up
            for name in _order(r):
                ratio = dict(MODES)[name]
                tracing.configure(TracingConfig(disabled=True) if ratio is None else
                                  TracingConfig(otlp_traces_endpoint=endpoint,
                                                sampler="parentbased_traceidratio",
                                                sampler_arg=ratio), "bench")
                before, cpu = cluster.engine.steps, time.process_time()
                seconds, results = asyncio.run(_drive(
                    "http://in-process", cluster.model_name, prompts, args.output_len,
                    cluster.http_client()))
                tracing.flush()  # the round's export is the round's cost
                rounds.add(r, name, seconds, sum(x[2] for x in results),
                           cluster.engine.steps - before, time.process_time() - cpu)
    finally:
        tracing.shutdown()
        cluster.close()
    return rounds.report(f"in one process: {args.model}, 2 expert shards over gRPC, "
                         f"{args.streams} streams x {args.output_len} tokens, "
                         f"{args.rounds} rounds", spans.count)


def run_on_serve(args: argparse.Namespace, prompts: list[list[int]], endpoint: str,
                 spans: Any) -> float:
    import ray
    from ray import serve

    args.http_port = free_port()
    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    rounds = Rounds()
    try:
        deploy_modes(args, endpoint)
        for r in range(-1, args.rounds):  # round -1 warms every mode up
            for name in _order(r):
                worker = serve.get_deployment_handle("AttentionWorker", app_name=_app(name))
                before = worker.stats.remote().result()["engine_steps_total"]
                seconds, results = asyncio.run(_drive(
                    f"http://127.0.0.1:{args.http_port}/{_app(name)}", args.model, prompts,
                    args.output_len))
                after = worker.stats.remote().result()["engine_steps_total"]
                rounds.add(r, name, seconds, sum(x[2] for x in results), after - before)
        time.sleep(2.0)  # the last spans' export
    finally:
        serve.shutdown()
        ray.shutdown()
    return rounds.report(f"Ray Serve: {args.model}, 2 expert shards per app, {args.streams} "
                         f"streams x {args.output_len} tokens, {args.rounds} rounds",
                         spans.count)


def report_off_path(step_s: float, layers: int, streams: int) -> None:
    print(f"\noff path, per call (step time with tracing off: {step_s * 1e3:.2f} ms):")
    costs = off_path_cost()
    for what, s in costs.items():
        print(f"  {what:<44} {s * 1e9:8.0f} ns")
    # Per step: the runner's hooks per micro-batch (2), a dispatch_group and two shard calls
    # per micro-batch per layer, every running request's on_tokens.
    per_step = (2 * costs["runner hooks (per micro-batch step)"]
                + 2 * layers * (costs["dispatch_group (per dispatch)"]
                                + 2 * costs["trace_metadata (per shard call)"]
                                + 2 * costs["tracing_on (per shard call, in the shard)"])
                + streams * costs["on_tokens (per request per step)"])
    print(f"  hooks per step ({layers} layers, 2 micro-batches, 2 shards, {streams} requests): "
          f"{per_step * 1e6:.1f} us = {100 * per_step / step_s:.4f}% of a step")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zayaserve.bench.tracing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(32, 128))
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine/replica")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve", action="store_true",
                    help="measure on a local Ray Serve cluster instead of in one process")
    args = ap.parse_args(argv)

    from zayaserve.bench.otlp_sink import SinkProcess
    from zayaserve.replicas.model.checkpoint_paths import resolve_model
    from zayaserve.replicas.model.config import ZayaConfig

    mc = ZayaConfig.from_pretrained(resolve_model(args.model))
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(4, mc.vocab_size) for _ in range(rng.randint(*args.prompt_len))]
               for _ in range(args.streams)]
    sink = SinkProcess()
    try:
        run = run_on_serve if args.serve else run_in_process
        step_s = run(args, prompts, sink.endpoint, sink)
        report_off_path(step_s, mc.num_hidden_layers, args.streams)
    finally:
        sink.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
