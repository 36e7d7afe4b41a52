"""Engine step overhead: everything a step does besides the model forward (scheduling, block
bookkeeping, sampling, stop checks, detokenising, building outputs), per step and per sequence,
on the tiny preset at several decode batch sizes. The model forward (`runner.execute`) is timed in
the same steps and printed beside it as the baseline: on a GPU the forward of a 760M-active
model is a few ms, so this overhead is what limits a step.

    python -m zayaserve.bench.step_overhead [--batches 1 64 256] [--steps 40]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def measure(batch: int, steps: int, warmup: int = 5) -> dict[str, float]:
    import torch

    from zayaserve import LLM, SamplingParams
    from zayaserve.replicas.model.checkpoint_paths import resolve_model

    torch.manual_seed(0)
    llm = LLM(model=str(resolve_model("tiny")), max_num_seqs=batch,
              max_num_batched_tokens=max(2048, batch * 8), num_kv_blocks=batch * 8 + 8,
              enable_prefix_caching=False, async_scheduling=False,
              output_thread=False)
    engine = llm.engine
    runner = engine.runner
    forward_s: list[float] = []
    real_run = runner.execute

    def timed_run(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return real_run(*args, **kw)
        finally:
            forward_s.append(time.perf_counter() - t)

    runner.execute = timed_run  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1, ignore_eos=True,
                            max_tokens=warmup + steps + 8)
    for i in range(batch):
        engine.add_request(f"r{i}", [2, 10 + i % 400, 11, 12, 13, 14, 15, 16], params)
    while any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running) or \
            engine.scheduler.waiting:  # prefill everything first: only decode steps count
        engine.step()
    overheads: list[float] = []
    forwards: list[float] = []
    for i in range(warmup + steps):
        forward_s.clear()
        t = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - t
        assert len(outputs) == batch, "every sequence must decode in every measured step"
        if i >= warmup:
            forwards.append(sum(forward_s))
            overheads.append(max(elapsed - forwards[-1], 0.0))
    overhead = statistics.median(overheads)
    return {"batch": batch, "overhead_ms": overhead * 1e3, "per_seq_us": overhead / batch * 1e6,
            "forward_ms": statistics.median(forwards) * 1e3}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print("| decode batch | step overhead (median) | per sequence | model forward (baseline) "
          "| overhead / forward |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        r = measure(batch, args.steps)
        print(f"| {batch} | {r['overhead_ms']:.2f} ms | {r['per_seq_us']:.1f} us "
              f"| {r['forward_ms']:.2f} ms | {r['overhead_ms'] / r['forward_ms']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
