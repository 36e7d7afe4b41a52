"""Serving benchmark on a local Ray Serve cluster: concurrent streaming clients over REST.

Three deployments of the same model, measured with the same seeded workload, one after the
other in one run:
  (a) experts in-process (attention workers hold the experts; no gRPC),
  (b) 2 expert shards over gRPC, micro-batch overlap off,
  (c) 2 expert shards over gRPC, micro-batch overlap on.
Prints throughput, TTFT and inter-token latency p50/p99 per mode, the ratios (c)/(a) and
(c)/(b), gRPC bytes per token and the per-layer dispatch round trip.

    python -m zayaserve.bench.serve [--model small] [--streams 32]
    zayaserve bench serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zayaserve.bench.local_services import free_port


@dataclass
class ModeResult:
    name: str
    seconds: float
    output_tokens: int
    ttft: list[float]
    itl: list[float]
    stats: dict[str, Any]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _stream_one(client: Any, url: str, body: dict[str, Any]) -> tuple[float, list[float],
                                                                            int]:
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ttft = stamps[0] - start if stamps else float("nan")
    return ttft, [b - a for a, b in zip(stamps, stamps[1:], strict=False)], tokens


async def _drive(base: str, model: str, prompts: list[list[int]], max_tokens: int,
                 client: Any = None) -> tuple[float, list[tuple[float, list[float], int]]]:
    """All prompts streamed at once (after one warm-up request); `client`: an httpx
    AsyncClient to use (e.g. over an in-process ASGI app), else one is made."""
    import httpx

    async with client or httpx.AsyncClient(timeout=600) as client:
        url = base + "/v1/completions"
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        await _stream_one(client, url, {**body, "prompt": prompts[0], "max_tokens": 4})  # warm
        t = time.perf_counter()
        results = await asyncio.gather(*(_stream_one(client, url, {**body, "prompt": p})
                                         for p in prompts))
        return time.perf_counter() - t, list(results)


def run_mode(name: str, args: argparse.Namespace, prompts: list[list[int]],
             micro_batches: int = 2, **cluster: Any) -> ModeResult:
    from ray import serve

    from zayaserve.cluster.config import ClusterConfig
    from zayaserve.cluster.serve_cli import APP_NAME, deploy

    cfg = ClusterConfig.create(model=args.model, http_port=args.http_port, grpc_port=0,
                               replica_num_cpus=0.1, **cluster,
                               engine={"max_num_seqs": args.streams, "num_threads": args.threads,
                                       "micro_batches": micro_batches})
    deploy(cfg)
    try:
        if cfg.expert_shards:
            ctl = serve.get_deployment_handle("PlacementController", app_name=APP_NAME)
            while len(ctl.placement.remote().result().addresses) < cfg.expert_shards:
                time.sleep(0.5)
        seconds, results = asyncio.run(_drive(f"http://127.0.0.1:{cfg.http_port}",
                                              cfg.model_name, prompts, args.output_len))
        worker = serve.get_deployment_handle("AttentionWorker", app_name=APP_NAME)
        stats = worker.stats.remote().result()
    finally:
        serve.delete(APP_NAME, _blocking=True)
    return ModeResult(name, seconds, sum(r[2] for r in results), [r[0] for r in results],
                      [gap for r in results for gap in r[1]], stats)


def report(r: ModeResult) -> str:
    line = (f"{r.name:<34} {r.tokens_per_s:8.1f} tok/s  TTFT p50 {_pct(r.ttft, .5)*1e3:7.0f} ms"
            f" p99 {_pct(r.ttft, .99)*1e3:7.0f} ms  ITL p50 {_pct(r.itl, .5)*1e3:6.1f} ms"
            f" p99 {_pct(r.itl, .99)*1e3:7.1f} ms")
    s = r.stats
    if s.get("router_calls_total"):
        grpc_bytes = s["router_bytes_sent_total"] + s["router_bytes_received_total"]
        rows = max(1, s["router_rows_sent_total"])
        rtt_ms = 1e3 * s["router_dispatch_seconds_sum"] / max(1, s["router_dispatch_seconds_count"])
        line += (f"\n{'':<34} gRPC {grpc_bytes / rows:6.0f} B per dispatched token-row, "
                 f"{grpc_bytes / max(1, r.output_tokens) / 1e3:7.1f} kB per output token "
                 f"(prefill included); layer dispatch round trip mean {rtt_ms:.2f} ms; "
                 f"{s['router_rows_skipped_total']} skip rows never sent")
    return line


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zayaserve bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(64, 256))
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.http_port = free_port()  # one Serve HTTP proxy per Ray session, shared by the modes

    import ray

    from zayaserve.replicas.model.checkpoint_paths import resolve_model
    from zayaserve.replicas.model.config import ZayaConfig

    vocab = ZayaConfig.from_pretrained(resolve_model(args.model)).vocab_size
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(*args.prompt_len))]
               for _ in range(args.streams)]
    ray.init(include_dashboard=False, logging_level=logging.ERROR,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    try:
        a = run_mode("(a) experts in-process", args, prompts, expert_shards=0)
        print(report(a), flush=True)
        b = run_mode("(b) 2 shards, no overlap", args, prompts, expert_shards=2,
                     micro_batches=1)
        print(report(b), flush=True)
        c = run_mode("(c) 2 shards, micro-batch overlap", args, prompts, expert_shards=2,
                     micro_batches=2)
        print(report(c), flush=True)
        print(f"ratio (c)/(a) throughput: {c.tokens_per_s / a.tokens_per_s:.2f}")
        print(f"ratio (c)/(b) throughput: {c.tokens_per_s / b.tokens_per_s:.2f}")
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
