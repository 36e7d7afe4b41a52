"""Where disaggregation pays (SIMULATION: devices are timed sleeps; the network is real).

Decode of ZAYA1-8B shapes, `m` tokens per micro-batch, `N` micro-batches per step:
- colocated: one device runs the whole step for B = N * m tokens, as one timed step;
- disaggregated: one attention device and two expert shards, each its own simulated device.
  N threads (the engine's micro-batches) each run 40 layers: the attention device's share of
  the layer (serialised across micro-batches: one device), then a real dispatch of its m rows
  through `RemoteExpertBackend` over gRPC to two shard processes on loopback, which sleep for
  their experts' time; then the lm_head.
A device's time is max(bytes / HBM bandwidth, FLOPs / peak), ZAYA1-8B bf16 shapes (sim_device).

Reported: step time, output tokens/s per device (colocated: 1 device; disaggregated: 3), and
their ratio; the crossover is the smallest m at which the ratio reaches 1. The dispatch's host
cost (bench/dispatch.py) is what the network adds per layer; "free network" is the bound,
computed: the same step if a dispatch cost nothing but the shards' device time.

    python -m zayaserve.bench.disagg [--tokens 8 32 128 512] [--micro-batches 1 2 4]
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from zayaserve.bench import dispatch
from zayaserve.bench.sim_device import BANDWIDTH, StepCost, device_seconds, hold

CONTEXT = 1024  # tokens of context per sequence


def colocated_step_s(cost: StepCost, preset: str, tokens: int) -> float:
    flops = tokens * (cost.dense + cost.num_layers * cost.expert)  # active weights, 2 FLOP each
    return device_seconds(preset, cost.step_bytes(tokens, tokens, CONTEXT), flops)


def disaggregated_step_s(backend: Any, cost: StepCost, preset: str, m: int, n: int,
                         steps: int = 3) -> float:
    device = threading.Lock()  # one attention device: micro-batches take turns on it
    g = torch.Generator().manual_seed(m)
    hidden = torch.randn(m, dispatch.HIDDEN, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, dispatch.EXPERTS + 1, (m,), generator=g)
    weights = torch.rand(m, generator=g)
    attn = device_seconds(preset, cost.attention_bytes(m, CONTEXT),
                    m * (cost.dense - cost.embedding) / cost.num_layers)
    head = device_seconds(preset, cost.head_bytes(), m * cost.embedding)

    def micro_batch() -> None:
        for layer in range(cost.num_layers):
            with device:
                hold(attn)
            backend(layer, hidden, ids, weights)
        with device:
            hold(head)

    pool = ThreadPoolExecutor(n)
    list(pool.map(lambda _: micro_batch(), range(n)))  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        list(pool.map(lambda _: micro_batch(), range(n)))
    pool.shutdown()
    return (time.perf_counter() - t) / steps


def free_network_step_s(cost: StepCost, preset: str, m: int, n: int) -> float:
    """The bound, computed (a sleep cannot time microseconds): the step if dispatch cost
    nothing, i.e. the busiest device's work, or one micro-batch's chain of layers."""
    attn = device_seconds(preset, cost.attention_bytes(m, CONTEXT),
                    m * (cost.dense - cost.embedding) / cost.num_layers)
    head = device_seconds(preset, cost.head_bytes(), m * cost.embedding)
    rows = m * dispatch.EXPERTS // (dispatch.EXPERTS + 1) // 2  # per shard, skip rows left out
    shard = device_seconds(preset, cost.expert_bytes(rows, dispatch.EXPERTS // 2),
                     cost.expert_flops(rows))
    layers = cost.num_layers
    return max(n * (layers * attn + head), n * layers * shard, layers * (attn + shard) + head)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 32, 128, 512])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--device", default="h100", choices=sorted(BANDWIDTH))
    args = p.parse_args(argv)
    from zayaserve.router.remote_experts import RemoteExpertBackend

    torch.set_num_threads(1)
    cost = StepCost.zaya1_8b()
    procs, placement = dispatch.start_shards(2, compute=f"sim:{args.device}")
    backend = RemoteExpertBackend(lambda: placement, dispatch.EXPERTS)
    try:
        print(f"\nsimulated {args.device} devices (SIMULATION), real gRPC dispatch over "
              f"loopback, 2 shards, context {CONTEXT}\n")
        print("| tokens / micro-batch | micro-batches | colocated step | disaggregated step "
              "| tok/s/device colocated | tok/s/device disaggregated | ratio "
              "| ratio, free network |")
        print("|---|---|---|---|---|---|---|---|")
        crossover: int | None = None
        for m in args.tokens:
            for n in args.micro_batches:
                colo = colocated_step_s(cost, args.device, m * n)
                dis = disaggregated_step_s(backend, cost, args.device, m, n)
                free = free_network_step_s(cost, args.device, m, n)
                per_colo, per_dis = m * n / colo, m * n / dis / 3
                ratio = per_dis / per_colo
                if ratio >= 1 and crossover is None:
                    crossover = m
                print(f"| {m} | {n} | {colo * 1e3:.2f} ms | {dis * 1e3:.1f} ms "
                      f"| {per_colo:.0f} | {per_dis:.0f} | {ratio:.3f} "
                      f"| {m * n / free / 3 / per_colo:.3f} |", flush=True)
        print(f"\ncrossover (tokens per micro-batch where disaggregated tok/s/device reaches "
              f"colocated): {crossover if crossover is not None else 'not within the sweep'}")
    finally:
        for proc in procs:
            proc.kill()


if __name__ == "__main__":
    main()
