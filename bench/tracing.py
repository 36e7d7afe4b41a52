"""What tracing costs: serving throughput with tracing off, on at 10% sampling and on at 100%,
measured in one run on one local Ray Serve cluster, and the off path's per-step cost.

The three configurations are three Serve applications side by side (same model, two expert
shards each, own route prefix), so the rounds interleave without redeploys: every round drives
each application once with the same seeded streaming workload, in a rotating order, and the
figures are the medians over rounds. Traces go to a real OTLP/gRPC receiver in this process
(`otlp_sink`), so exporting costs what it costs.

"Off" is then compared with no tracing code at all by timing the hooks the serving path runs
when tracing is off (per step, per dispatch, per shard call, per request) against the measured
step time.

    python -m zayaserve.bench.tracing [--model small] [--streams 16] [--rounds 5]
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

from zayaserve.bench.serve import _drive, _free_port

MODES = (("off", None), ("10%", 0.1), ("100%", 1.0))


def deploy_modes(args: argparse.Namespace, endpoint: str) -> None:
    from ray import serve

    from zayaserve.cluster.app import build_app
    from zayaserve.cluster.config import ClusterConfig

    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    for name, ratio in MODES:
        tracing = ({"disabled": True} if ratio is None else
                   {"otlp_traces_endpoint": endpoint, "sampler": "parentbased_traceidratio",
                    "sampler_arg": ratio})
        cfg = ClusterConfig.create(
            model=args.model, http_port=args.http_port, grpc_port=0, replica_num_cpus=0.1,
            expert_shards=2, tracing=tracing,
            engine={"max_num_seqs": args.streams, "num_threads": args.threads})
        serve.run(build_app(cfg), name=_app(name), route_prefix=f"/{_app(name)}")
        ctl = serve.get_deployment_handle("PlacementController", app_name=_app(name))
        while len(ctl.placement.remote().result()["addresses"]) < 2:
            time.sleep(0.5)


def _app(mode: str) -> str:
    return "tracing-" + mode.replace("%", "pct")


def off_path_cost(steps: int = 20000) -> dict[str, float]:
    """Seconds per call of each hook the serving path runs with tracing off."""
    from zayaserve.replicas.engine.params import SamplingParams
    from zayaserve.replicas.engine.request_timeline import RequestTimeline
    from zayaserve.replicas.observability import tracing
    from zayaserve.router.dispatch_tracing import (
        set_step_requests,
        shard_span,
        step_links,
        trace_metadata,
        tracing_on,
    )

    assert tracing.tracer() is None
    timelines = [RequestTimeline() for _ in range(16)]
    params = SamplingParams()
    metadata = (("authorization", "Bearer x"),)

    def shard_call() -> None:  # what ExpertShardServicer.Dispatch does first
        if tracing_on():
            with shard_span(metadata, "shard-0", 0, 8):
                pass

    def per_request() -> None:
        t = RequestTimeline.begin("r", 100, params, None)
        t.on_scheduled()
        t.on_prefill_chunk(0, 100)
        t.on_tokens()
        t.finish(1, ["length"])

    def time_of(fn: Any) -> float:
        return min(timeit.repeat(fn, number=steps, repeat=5)) / steps

    return {"set_step_requests (per micro-batch step)":
            time_of(lambda: set_step_requests(timelines)),
            "step_links (per dispatch)": time_of(step_links),
            "trace_metadata (per shard call)": time_of(trace_metadata),
            "shard_span (per shard call, in the shard)": time_of(shard_call),
            "request timeline (per request)": time_of(per_request),
            "on_tokens (per request per step)": time_of(timelines[0].on_tokens)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zayaserve.bench.tracing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(32, 128))
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.http_port = _free_port()

    import ray
    from ray import serve

    from zayaserve.bench.otlp_sink import OtlpReceiver
    from zayaserve.replicas.model.checkpoint_paths import resolve_model
    from zayaserve.replicas.model.config import ZayaConfig

    mc = ZayaConfig.from_pretrained(resolve_model(args.model))
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(4, mc.vocab_size) for _ in range(rng.randint(*args.prompt_len))]
               for _ in range(args.streams)]
    sink = OtlpReceiver()
    ray.init(include_dashboard=False, logging_level=logging.ERROR,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    rates: dict[str, list[float]] = {name: [] for name, _ in MODES}
    steps: dict[str, tuple[float, float]] = {}
    try:
        deploy_modes(args, sink.endpoint)
        order = [name for name, _ in MODES]
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                worker = serve.get_deployment_handle("AttentionWorker", app_name=_app(name))
                before = worker.stats.remote().result()["engine_steps_total"]
                seconds, results = asyncio.run(_drive(
                    f"http://127.0.0.1:{args.http_port}/{_app(name)}", args.model, prompts,
                    args.output_len))
                after = worker.stats.remote().result()["engine_steps_total"]
                rates[name].append(sum(x[2] for x in results) / seconds)
                spent, count = steps.get(name, (0.0, 0.0))
                steps[name] = (spent + seconds, count + after - before)
                print(f"round {r} {name:>5}: {rates[name][-1]:7.1f} tok/s", flush=True)
        time.sleep(2.0)  # the last spans' export
        median = {name: statistics.median(v) for name, v in rates.items()}
        print(f"\n{args.model}, 2 expert shards, {args.streams} streams x {args.output_len} "
              f"tokens, {args.rounds} rounds (median tok/s; min-max):")
        for name, _ in MODES:
            print(f"  tracing {name:>5}: {median[name]:7.1f}  ({min(rates[name]):.1f}-"
                  f"{max(rates[name]):.1f})  ratio to off {median[name] / median['off']:.3f}")
        print(f"  spans received: {len(sink.spans)}")
        step_s = steps["off"][0] / max(1.0, steps["off"][1])
        print(f"\noff path, per call (step time with tracing off: {step_s * 1e3:.2f} ms):")
        costs = off_path_cost()
        for what, s in costs.items():
            print(f"  {what:<44} {s * 1e9:8.0f} ns")
        # Per step: one set_step_requests per micro-batch (2), a step_links and two shard
        # calls per micro-batch per layer, every running request's on_tokens.
        layers = mc.num_hidden_layers
        per_step = (2 * costs["set_step_requests (per micro-batch step)"]
                    + 2 * layers * (costs["step_links (per dispatch)"]
                                    + 2 * costs["trace_metadata (per shard call)"])
                    + args.streams * costs["on_tokens (per request per step)"])
        print(f"  worker-side hooks per step ({layers} layers, 2 micro-batches, {args.streams} "
              f"requests): {per_step * 1e6:.1f} us = {100 * per_step / step_s:.3f}% of a step")
    finally:
        serve.shutdown()
        ray.shutdown()
        sink.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
