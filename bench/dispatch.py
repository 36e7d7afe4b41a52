"""The token router's per-layer dispatch overhead: everything a remote-expert layer costs the
attention side except the expert compute (routing, encoding, gRPC both ways, the shard's server,
combining). Two expert shards, each in its own process on loopback, hold ZAYA1-8B's 16 experts
(8 each); their compute is `hidden * weight` (no GEMM), so what is timed is the host path. The
engine thread calls `RemoteExpertBackend` exactly as a layer does.

    python -m zayaserve.bench.dispatch [--rows 1 16 64 256] [--layers 200]

Prints the median and p90 per-layer dispatch time per row count, and the rows' bytes each way.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch

HIDDEN = 2048  # ZAYA1-8B
EXPERTS = 16
LAYERS = 40


def _shard_main(shard_id: str, experts: list[int], ready: Any, mode: str) -> None:
    from zayaserve.bench.sim_device import StepCost, device_seconds, hold
    from zayaserve.router.shard_server import ExpertShardServicer, serve_shard

    torch.set_num_threads(1)
    cost = StepCost.zaya1_8b()

    def compute(layer: int, hidden: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        if mode.startswith("sim:"):
            preset, rows = mode[4:], hidden.shape[0]
            hold(device_seconds(preset, cost.expert_bytes(rows, len(experts)),
                                cost.expert_flops(rows)))
        return hidden * weights.unsqueeze(1).to(hidden.dtype)

    async def main() -> None:
        servicer = ExpertShardServicer(shard_id, compute, experts, 0, num_layers=LAYERS)
        server, _ = await serve_shard(servicer, host="127.0.0.1", port=0)
        ready.put((shard_id, servicer.address))
        await server.wait_for_termination()

    asyncio.run(main())


def start_shards(num: int = 2, compute: str = "none") -> tuple[list[Any], Any]:
    """`num` shard processes splitting the experts; returns them and the placement map.
    `compute`: "none" (hidden * weight: the host path alone), or "sim:<preset>" (also sleeps
    for its simulated device's time: bench/disagg.py)."""
    from zayaserve.router.placement import PlacementMap

    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    per = EXPERTS // num
    held = {f"s{i}": list(range(i * per, (i + 1) * per)) for i in range(num)}
    procs = [ctx.Process(target=_shard_main, args=(s, e, ready, compute), daemon=True)
             for s, e in held.items()]
    for p in procs:
        p.start()
    addresses = dict(ready.get(timeout=120) for _ in procs)
    replicas = {e: (s,) for s, experts in held.items() for e in experts}
    return procs, PlacementMap(1, EXPERTS, replicas, addresses)


def measure(backend: Any, rows: int, layers: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, HIDDEN, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, EXPERTS + 1, (rows,), generator=g)  # the skip class included
    weights = torch.rand(rows, generator=g)
    for layer in range(10):  # warm-up: channels, first calls
        backend(layer % LAYERS, hidden, ids, weights)
    times = []
    for i in range(layers):
        t = time.perf_counter()
        out = backend(i % LAYERS, hidden, ids, weights)
        times.append(time.perf_counter() - t)
    sent = ids != EXPERTS
    want = torch.where(sent.unsqueeze(1), hidden * weights.unsqueeze(1).to(hidden.dtype),
                       torch.zeros_like(hidden))
    assert torch.equal(out, want), "the combined rows are not the shards' answers"
    times.sort()
    return {"rows": rows, "median_us": statistics.median(times) * 1e6,
            "p90_us": times[int(0.9 * len(times))] * 1e6,
            "kib": int(sent.sum()) * HIDDEN * 2 / 1024}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--layers", type=int, default=200)
    p.add_argument("--shards", type=int, default=2)
    args = p.parse_args(argv)
    from zayaserve.router.remote_experts import RemoteExpertBackend

    torch.set_num_threads(1)
    procs, placement = start_shards(args.shards)
    backend = RemoteExpertBackend(lambda: placement, EXPERTS)
    try:
        print(f"\nper-layer dispatch, {args.shards} shards on loopback (own processes), "
              f"hidden {HIDDEN} bf16, expert compute excluded\n")
        print("| rows | median | p90 | bytes each way |")
        print("|---|---|---|---|")
        for rows in args.rows:
            r = measure(backend, rows, args.layers)
            print(f"| {rows} | {r['median_us']:.0f} us | {r['p90_us']:.0f} us "
                  f"| {r['kib']:.0f} KiB |", flush=True)
    finally:
        for proc in procs:
            proc.kill()


if __name__ == "__main__":
    main()
