"""End-to-end offline decode at ZAYA1-8B shapes (bf16): output tok/s at each batch size with
equal-length random prompts, TTFT, and each as a fraction of the HBM roofline, decode graphs on
and off. The kernel set is chosen per process by ZAYASERVE_KERNELS (torch|triton).

Requests are added at once and stepped by the engine (chunked prefill of
max_num_batched_tokens); TTFT is add -> first token. Once every sequence has its first token,
a few warm-up decode steps run (graph capture, autotuning), then `--gen-len` timed steps in
which every sequence decodes; they are aborted afterwards. Roofline of a decode step at batch B
(bytes it must read, over the measured read+write bandwidth of a device copy of ~1 GiB):
  - all attention-side parameters: a tied embedding/lm_head matrix once (lm_head reads all of
    it); an untied embedding is left out (a lookup reads B rows);
  - per layer, the distinct experts the batch routes to x one expert's gate_up + down, counted
    in the warm-up decode steps (skip-class tokens use no expert);
  - K and V of every visible position (min(context, window) on sliding layers), mean context
    of the timed steps; and the CCA states (conv tail + delayed v), read and written.

    python -m zayaserve.bench.decode_e2e [--batches 1 16 64 256] [--graphs on off] [--json F]
    python -m zayaserve.bench.decode_e2e --dry-run   # CPU, random:tiny, the same code path
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from zayaserve.replicas.model.experts import ExpertBackend, LocalExpertBackend

WARMUP_STEPS = 3
COUNT_STEPS = 2  # eager, untimed: the distinct experts each layer routes to


class CountingExperts(ExpertBackend):
    """Delegates, counting the distinct experts each layer's calls route to."""

    def __init__(self, inner: ExpertBackend) -> None:
        self.inner, self.num_experts = inner, inner.num_experts
        self.counts: dict[int, list[int]] = {}

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        routed = expert_ids[expert_ids < self.num_experts]
        self.counts.setdefault(layer, []).append(int(torch.unique(routed).numel()))
        return self.inner(layer, hidden, expert_ids, weights)

    def distinct(self) -> dict[int, float]:
        """Mean distinct experts per call, by layer."""
        return {layer: statistics.fmean(n) for layer, n in self.counts.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbs(device: torch.device, mib: int, reps: int = 5) -> float:
    """Best read+write bandwidth of `dst.copy_(src)`, GB/s (cuda events on a GPU)."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    nbytes = src.nbytes
    del src, dst
    return 2 * nbytes / min(times) / 1e9


def step_bytes(engine: Any, batch: int, context: float, distinct: dict[int, float]) -> float:
    """Bytes one decode step must read (see the module docstring)."""
    cfg, model, cache = engine.model_config, engine.model, engine.cache
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    total = float(sum(p.nbytes for p in model.parameters() if tied or p is not embed))
    experts = engine.experts
    assert isinstance(experts, LocalExpertBackend), "the roofline needs local experts"
    for layer, n in distinct.items():
        w = experts.layers[layer]
        total += n * (w.gate_up[0].nbytes + w.down[0].nbytes)
    elem = cache.k[0].element_size()
    for layer in range(cfg.num_hidden_layers):
        window = cfg.window(layer)
        visible = context if window is None else min(context, window)
        total += batch * visible * 2 * cfg.kv_size * elem
    state = cfg.conv_state_len * cfg.conv_channels + cfg.v_state_size
    total += 2 * batch * cfg.num_hidden_layers * state * cache.conv_state.element_size()
    return total


def run_variant(llm: Any, batch: int, graphs: Any, use_graphs: bool, a: argparse.Namespace,
                gen_len: int, max_tokens: int) -> dict[str, Any]:
    from zayaserve import SamplingParams

    engine, runner = llm.engine, llm.engine.runner
    runner.graphs = graphs if use_graphs else None
    rng = random.Random(batch)  # same prompts with graphs on and off
    vocab = engine.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(a.prompt_len)] for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"{'g' if use_graphs else 'e'}{batch}-{i}" for i in range(batch)]
    first: dict[str, float] = {}
    tokens: list[int] = []

    def step() -> int:
        deltas = engine.step()
        sync(engine.device)
        now = time.perf_counter()
        for d in deltas:
            first.setdefault(d.request_id, now)
            if d.request_id == ids[0]:
                tokens.extend(t for c in d.completions for t in c.token_ids)
        return len(deltas)

    sync(engine.device)
    t0 = time.perf_counter()
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    try:  # aborted at the end: the timed steps never let a sequence finish
        while len(first) < batch:
            step()
        ttfts = [first[rid] - t0 for rid in ids]
        for _ in range(WARMUP_STEPS):  # graphs captured, kernels tuned
            assert step() == batch, "every sequence must decode in the warm-up steps"
        # Routing counted on eager steps: a replayed graph (whole-step graphs hold the experts
        # they were captured with) makes no Python call to count.
        counter = CountingExperts(runner.experts)
        runner.experts, runner.graphs = counter, None
        try:
            for _ in range(COUNT_STEPS):
                assert step() == batch, "every sequence must decode in the counted steps"
        finally:
            runner.experts = counter.inner
            runner.graphs = graphs if use_graphs else None
        contexts = [s.num_tokens for s in engine.scheduler.running]
        assert len(contexts) == batch, "every sequence must be running before the timed steps"
        t = time.perf_counter()
        for _ in range(gen_len):
            assert step() == batch, "raise max_tokens: a sequence stopped inside the timed steps"
        elapsed = time.perf_counter() - t
    finally:
        for rid in ids:
            engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    context = statistics.fmean(contexts) + (gen_len - 1) / 2
    distinct = counter.distinct()
    need = step_bytes(engine, batch, context, distinct)
    step_s = elapsed / gen_len
    return {"batch": batch, "graphs": use_graphs, "prompt_len": a.prompt_len,
            "decode_steps": gen_len, "tok_s": batch * gen_len / elapsed,
            "step_ms": step_s * 1e3, "ttft_ms": statistics.fmean(ttfts) * 1e3,
            "ttft_max_ms": max(ttfts) * 1e3, "bytes_per_step": need,
            "roofline_step_ms": need / (a.copy_gbs * 1e9) * 1e3,
            "roofline_fraction": need / (a.copy_gbs * 1e9) / step_s, "copy_gbs": a.copy_gbs,
            "distinct_experts": statistics.fmean(distinct.values()),
            "first_tokens": tokens}


def summarize(rows: list[dict[str, Any]]) -> None:
    by = {(r["batch"], r["graphs"]): r for r in rows}
    for batch in sorted({r["batch"] for r in rows}):
        on, off = by.get((batch, True)), by.get((batch, False))
        if on and off:
            same = "same" if on["first_tokens"] == off["first_tokens"] else "DIFFERENT"
            print(f"batch {batch:4d}: graphs / eager = {on['tok_s'] / off['tok_s']:.2f}x "
                  f"(first sequence's tokens: {same})")
    one_on, one_off = by.get((1, True)), by.get((1, False))
    if one_on and one_off:
        ratio = one_on["tok_s"] / one_off["tok_s"]
        print(f"target batch 1 graphs >= 1.5x eager: {ratio:.2f}x -> "
              f"{'met' if ratio >= 1.5 else 'not met'}")
    b64 = by.get((64, True)) or by.get((64, False))
    if b64:
        frac = b64["roofline_fraction"]
        print(f"target batch 64 >= 50% of roofline (graphs {'on' if b64['graphs'] else 'off'}): "
              f"{frac:.1%} -> {'met' if frac >= 0.5 else 'not met'}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zayaserve.bench.decode_e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:zaya1-8b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=64, help="timed decode steps")
    ap.add_argument("--graphs", nargs="+", choices=["on", "off"], default=["on", "off"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth copy")
    ap.add_argument("--json", help="write every result row to this file")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, random:tiny, batches 1 4, prompt 24, gen 6 (unless given): "
                    "seconds")
    a = ap.parse_args(argv)
    if a.dry_run:  # toy sizes, except where a flag was given
        toy = {"model": "random:tiny", "batches": [1, 4], "prompt_len": 24, "gen_len": 6,
               "device": "cpu", "max_num_batched_tokens": 64, "copy_mib": 16}
        for key, value in toy.items():
            if getattr(a, key) == ap.get_default(key):
                setattr(a, key, value)

    from zayaserve import LLM
    from zayaserve.kernels.registry import default_kernels
    from zayaserve.replicas.engine.decode_graphs import RerunCapture

    kernels, max_b, budget, bs = default_kernels(), max(a.batches), a.max_num_batched_tokens, 16
    if budget <= max_b:
        ap.error("--max-num-batched-tokens must exceed the largest batch")
    # Sequences prefilled early decode while the rest prefill: leave them room to keep going.
    prefill_steps = -(-max_b * a.prompt_len // (budget - max_b)) + 2
    max_tokens = 1 + prefill_steps + WARMUP_STEPS + COUNT_STEPS + a.gen_len
    max_len = -(-(a.prompt_len + max_tokens) // bs) * bs
    llm = LLM(a.model, device=a.device, max_num_seqs=max_b, max_num_batched_tokens=budget,
              max_model_len=max_len, num_kv_blocks=max_b * (max_len // bs) + 8, block_size=bs,
              enable_prefix_caching=False, seed=0, output_thread=False)  # deltas per step
    engine = llm.engine
    graphs = engine.runner.graphs
    if engine.device.type != "cuda":  # the CPU stand-in for graphs: same path, no driver
        graphs = engine.decode_graphs(RerunCapture())
    if "on" in a.graphs and graphs is None:
        ap.error("--graphs on: the engine built no decode graphs")
    a.copy_gbs = copy_bandwidth_gbs(engine.device, a.copy_mib)
    print(f"model {a.model} | kernels {kernels} | device {engine.device} | dtype "
          f"{engine.model.dtype} | prompt {a.prompt_len}, {a.gen_len} timed decode steps | "
          f"copy bandwidth {a.copy_gbs:.1f} GB/s", flush=True)
    # Untimed: JIT compiles and autotunes a full-budget prefill, a mixed step and decodes.
    run_variant(llm, min(max_b, budget // a.prompt_len + 1), graphs, False, a, 2, max_tokens)
    rows = []
    for batch in a.batches:
        for mode in a.graphs:
            r = {"kernels": kernels, **run_variant(llm, batch, graphs, mode == "on", a,
                                                   a.gen_len, max_tokens)}
            rows.append(r)
            print(f"batch {batch:4d} graphs {mode:3s}: {r['tok_s']:9.1f} tok/s "
                  f"{r['step_ms']:8.2f} ms/step  TTFT {r['ttft_ms']:8.1f} ms "
                  f"(last {r['ttft_max_ms']:.1f})  {r['bytes_per_step'] / 1e9:.3f} GB/step "
                  f"-> {r['roofline_step_ms']:.2f} ms = {r['roofline_fraction']:.1%} of roofline"
                  f"  experts/layer {r['distinct_experts']:.1f}", flush=True)
    engine.runner.graphs = graphs if engine.device.type == "cuda" else None
    summarize(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
