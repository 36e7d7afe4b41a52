"""How busy the host keeps the accelerator (SIMULATION: the device is `bench/sim_device.py`).

The model forward is replaced by a timed device step (bytes over HBM bandwidth at ZAYA1-8B
shapes); everything else is the real engine: scheduling, block bookkeeping, temperature + top-p
seeded sampling (on the host CPU, over the tiny model's 512-token vocabulary), detokenizing, stop
checks and outputs. Offline `LLM.generate`, 48 tokens per request, every request added at once.

The sampler's tensor maths runs on the host CPU here (column "sampling"): on a GPU it is
kernels on the device's stream, which at batch 256 over ZAYA1-8B's 262k vocabulary also take
a millisecond or more of device time. With async scheduling it runs on the device thread, so
it is part of the step's critical path in both worlds.

Reported per batch size: device busy (simulated device seconds / wall seconds of the decode
steps), exposed host work per sequence per step ((wall - device) / steps / batch), and the host
CPU time per sequence per step (all threads: what overlap can hide, not remove).

Paths: `offline, sync` (async_scheduling and output_thread off: the baseline), `offline, async`
(the default: async scheduling, outputs made inline after each step), `offline, async+output`
(outputs made on the output thread), `async-engine` (AsyncLLMEngine with a streaming asyncio
consumer per request, the worker's engine path) and `async-engine+output`. The tokens of every path
are compared (they must be identical).

    python -m zayaserve.bench.host_path [--batches 1 16 64 256] [--device h100|mi300x]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from zayaserve.bench.sim_device import BANDWIDTH, SimulatedDevice
from zayaserve.replicas.engine.gc_freeze import freeze_startup_objects

GEN_LEN = 48


class SimulatedRunner:
    """Stands in for `ModelRunner` (same prepare/execute split): the step's cache ops are
    bookkeeping only; the forward is the simulated device's timed step, and the logits come
    from its table, looked up by each row's input token."""

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device

    def prepare(self, sched: Any) -> tuple[list[tuple[int, list[int], int]], float]:
        chunks = [(c.seq.seq_id, c.seq.token_ids[c.start:c.start + c.num_tokens], c.num_tokens)
                  for c in sched.chunks]
        seqs = len(sched.chunks)
        context = sum(c.start + c.num_tokens for c in sched.chunks) / max(seqs, 1)
        return chunks, self.device.seconds(sched.num_tokens, seqs, context)

    def execute(self, step: Any, rows: list[int], fill: Any = None) -> Any:
        chunks, seconds = step
        packed: list[int] = []
        for seq_id, tokens, n in chunks:
            packed.extend(tokens)
            if len(tokens) < n:
                packed.append(fill[seq_id])
        self.device.busy(seconds)
        return self.device.logits([packed[r] for r in rows])


def simulate(engine: Any, preset: str) -> SimulatedDevice:
    """Puts a simulated device under `engine` in place of its model runner, and times the
    sampler (its tensor maths stands in for the sampling kernels of a real device)."""
    device = SimulatedDevice(preset, vocab=engine.model_config.vocab_size)
    engine.runner = engine.pipeline.runner = SimulatedRunner(device)
    run = engine.sampler.run

    def timed(*args: Any) -> Any:
        t = time.perf_counter()
        try:
            return run(*args)
        finally:
            device.sampling_s += time.perf_counter() - t

    engine.sampler.run = timed
    return device


def prompts(batch: int, vocab: int) -> list[list[int]]:
    return [[2, *(10 + (i * 7 + j) % (vocab - 20) for j in range(15))] for i in range(batch)]


def _engine_kw(batch: int) -> dict[str, Any]:
    return dict(max_num_seqs=max(batch, 1), max_num_batched_tokens=max(2048, batch * 16),
                num_kv_blocks=batch * 8 + 16, enable_prefix_caching=False)


def _params() -> Any:
    from zayaserve import SamplingParams

    return SamplingParams(temperature=0.8, top_p=0.95, seed=1, max_tokens=GEN_LEN,
                          ignore_eos=True)


def _figures(batch: int, device: SimulatedDevice, wall: float, cpu: float,
             tokens: list[list[int]]) -> dict[str, Any]:
    assert all(len(t) == GEN_LEN for t in tokens)
    steps = device.steps
    return {"batch": batch, "steps": steps, "step_ms": wall / steps * 1e3,
            "device_ms": device.busy_s / steps * 1e3, "busy": device.busy_s / wall,
            "sampling_ms": device.sampling_s / steps * 1e3,
            "exposed_us": (wall - device.busy_s) / steps / batch * 1e6,
            "cpu_us": cpu / steps / batch * 1e6, "tokens": tokens}


def run_offline(batch: int, preset: str, freeze: bool = True, **engine_kw: Any
                ) -> dict[str, Any]:
    """Offline `LLM.generate` of `batch` requests on the simulated device."""
    from zayaserve import LLM
    from zayaserve.replicas.model.checkpoint_paths import resolve_model

    llm = LLM(model=str(resolve_model("tiny")), **{**_engine_kw(batch), **engine_kw})
    device = simulate(llm.engine, preset)
    ps = [{"prompt_token_ids": p} for p in prompts(batch, llm.engine.model_config.vocab_size)]
    llm.generate(ps[:2], _params())  # warm-up
    if freeze:
        freeze_startup_objects()  # as a serving process does after start-up
    device.reset()
    t, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(ps, _params())
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return _figures(batch, device, wall, cpu, [o.outputs[0].token_ids for o in outs])


def run_async_engine(batch: int, preset: str, **engine_kw: Any) -> dict[str, Any]:
    """The worker's engine path: `AsyncLLMEngine` on its loop thread, one asyncio consumer
    streaming each request's deltas (what a worker's stream handler reads)."""
    from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
    from zayaserve.replicas.engine.config import EngineConfig
    from zayaserve.replicas.engine.llm_engine import LLMEngine
    from zayaserve.replicas.model.checkpoint_paths import resolve_model

    engine = LLMEngine(EngineConfig(model=str(resolve_model("tiny")),
                                    **{**_engine_kw(batch), **engine_kw}))
    device = simulate(engine, preset)
    ps = prompts(batch, engine.model_config.vocab_size)
    runner = AsyncLLMEngine(engine, max_pending_requests=batch + 8)

    async def one(rid: str, prompt: list[int]) -> list[int]:
        out: list[int] = []
        async for delta in runner.generate(rid, prompt, _params()):
            out.extend(t for c in delta.completions for t in c.token_ids)
        return out

    async def all_of(tag: str, n: int) -> list[list[int]]:
        return list(await asyncio.gather(*(one(f"{tag}{i}", ps[i]) for i in range(n))))

    try:
        asyncio.run(all_of("w", min(2, batch)))  # warm-up
        freeze_startup_objects()  # as the attention worker does
        device.reset()
        t, cpu = time.perf_counter(), time.process_time()
        tokens = asyncio.run(all_of("r", batch))
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    finally:
        runner.shutdown()
    return _figures(batch, device, wall, cpu, tokens)


def table(rows: list[tuple[str, dict[str, Any]]], title: str) -> None:
    print(f"\n{title}\n")
    print("| path | batch | step (wall) | simulated device | sampling (CPU) | device busy "
          "| exposed host / seq / step | host CPU / seq / step |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['batch']} | {r['step_ms']:.2f} ms | {r['device_ms']:.2f} ms "
              f"| {r['sampling_ms']:.2f} ms | {r['busy']:.0%} | {r['exposed_us']:.1f} us "
              f"| {r['cpu_us']:.1f} us |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--device", default="h100", choices=sorted(BANDWIDTH))
    p.add_argument("--paths", nargs="+",
                   default=["sync", "async", "async+output", "async-engine",
                            "async-engine+output"],
                   choices=["sync", "async", "async+output", "async-engine",
                            "async-engine+output"])
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    for batch in args.batches:
        rows: list[tuple[str, dict[str, Any]]] = []
        for path in args.paths:
            if path.startswith("async-engine"):
                rows.append((path, run_async_engine(batch, args.device,
                                                    output_thread=path.endswith("+output"))))
            else:
                rows.append((f"offline, {path}", run_offline(
                    batch, args.device, async_scheduling=path != "sync",
                    output_thread=path == "async+output")))
        outs = {name: r["tokens"] for name, r in rows}
        same = all(t == rows[0][1]["tokens"] for t in outs.values())
        sync = next((r for name, r in rows if name == "offline, sync"), None)
        table(rows, f"batch {batch}, simulated {args.device} (SIMULATION); tokens identical "
                    f"across paths: {same}")
        if sync is not None:
            for name, r in rows:
                print(f"  {name}: device busy x{r['busy'] / sync['busy']:.2f} of sync")


if __name__ == "__main__":
    main()
