"""Paged attention: the Triton kernel vs the torch reference, at ZAYA1-8B shapes.

bf16, 8 query heads over 2 KV heads of dim 128, pages of 16 tokens scattered over the cache.
Decode batches of 1/16/64 sequences with contexts of 1k-8k tokens are memory bound: the figure
of merit is the bytes a step must read (every visible K/V row, q, out, block tables) over the
kernel time, against the GPU's peak HBM bandwidth. A few chunked-prefill rows report TFLOP/s.
The reference is timed with its `AttentionPlan` prebuilt (the engine builds it once per step
for all layers). Times are `triton.testing.do_bench` medians with the L2 flushed between runs.

    python -m zayaserve.bench.kernels_attention [--peak-gbs 3350] [--window W]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NQ, NKV, HEAD_DIM, BLOCK_SIZE = 8, 2, 128, 16  # ZAYA1-8B attention, the engine's page size


@dataclass(frozen=True)
class Result:
    label: str
    triton_ms: float
    torch_ms: float
    gbs: float
    tflops: float

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.triton_ms


def _make_inputs(q_lens: list[int], ctx_lens: list[int], seed: int = 0) -> tuple:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    per_seq = [-(-c // BLOCK_SIZE) for c in ctx_lens]
    num_blocks = sum(per_seq)
    # Shuffled block ids: a long-running server's pages are scattered, not contiguous.
    ids = torch.randperm(num_blocks, device="cuda", generator=gen)
    tables = torch.full((len(ctx_lens), max(per_seq)), -1, dtype=torch.int32, device="cuda")
    start = 0
    for s, n in enumerate(per_seq):
        tables[s, :n] = ids[start:start + n]
        start += n
    shape = (num_blocks * BLOCK_SIZE, NKV, HEAD_DIM)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(sum(q_lens), NQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                    generator=gen)
    qs = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                      device="cuda")
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    return q, k, v, qs, ctx, tables


def _visible(q_len: int, ctx: int, window: int | None) -> int:
    """Keys summed over the new tokens of one sequence (for FLOPs)."""
    first = ctx - q_len
    return sum(min(p + 1, window or p + 1) for p in range(first, ctx))


def _read_keys(q_len: int, ctx: int, window: int | None) -> int:
    """Distinct cache rows the step must read for one sequence (for bytes)."""
    return ctx if window is None else min(ctx, window + q_len - 1)


def bench_case(label: str, q_lens: list[int], ctx_lens: list[int],
               window: int | None) -> Result:
    from triton.testing import do_bench

    from zayaserve.kernels.paged_attention_ref import paged_attention_ref, plan_attention
    from zayaserve.kernels.paged_attention_triton import paged_attention_triton

    q, k, v, qs, ctx, tables = _make_inputs(q_lens, ctx_lens)
    scale = HEAD_DIM**-0.5
    plan = plan_attention(qs.tolist(), ctx.tolist(), tables.long(), BLOCK_SIZE)
    run_triton = lambda: paged_attention_triton(  # noqa: E731
        q, k, v, qs, ctx, tables, BLOCK_SIZE, scale, window)
    run_torch = lambda: paged_attention_ref(q, k, v, plan, scale, window)  # noqa: E731
    err = (run_triton().float() - run_torch().float()).abs().max().item()
    if err > 5e-2:
        raise RuntimeError(f"{label}: Triton and torch disagree by {err:.3g}")
    t_ms = do_bench(run_triton, warmup=25, rep=100)
    r_ms = do_bench(run_torch, warmup=5, rep=50)
    elem = q.element_size()
    kv_rows = sum(_read_keys(n, c, window) for n, c in zip(q_lens, ctx_lens, strict=True))
    nbytes = (kv_rows * 2 * NKV * HEAD_DIM * elem + 2 * q.numel() * elem
              + tables.numel() * tables.element_size())
    flops = sum(4 * NQ * HEAD_DIM * _visible(n, c, window)
                for n, c in zip(q_lens, ctx_lens, strict=True))
    return Result(label, t_ms, r_ms, nbytes / t_ms / 1e6, flops / t_ms / 1e9)


def bench_paged_attention(
    peak_gbs: float = 3350.0,
    batches: Sequence[int] = (1, 16, 64),
    contexts: Sequence[int] = (1024, 2048, 4096, 8192),
    window: int | None = None,
) -> list[Result]:
    """Prints one line per case; `peak_gbs` defaults to the H100 SXM's HBM3 bandwidth."""
    if not torch.cuda.is_available():
        sys.exit("bench_paged_attention needs a CUDA or ROCm GPU (torch.cuda.is_available() is "
                 "False); the CPU interpreter is for tests, not timings.")
    print(f"device: {torch.cuda.get_device_name()}  peak {peak_gbs:.0f} GB/s  window {window}")
    print(f"{'case':<34}{'triton ms':>10}{'torch ms':>10}{'speedup':>9}{'GB/s':>8}"
          f"{'% peak':>8}{'TFLOP/s':>9}")
    cases = [(f"decode B={b} ctx={c}", [1] * b, [c] * b) for b in batches for c in contexts]
    # Chunked prefill: 512-token chunks after 2k tokens of context, plus one mixed step.
    cases += [("prefill 4x512 after 2k", [512] * 4, [2560] * 4),
              ("mixed 32 decode + 1x512 chunk", [1] * 32 + [512], [4096] * 32 + [2560])]
    results = []
    for label, q_lens, ctx_lens in cases:
        r = bench_case(label, q_lens, ctx_lens, window)
        results.append(r)
        print(f"{r.label:<34}{r.triton_ms:>10.4f}{r.torch_ms:>10.3f}{r.speedup:>8.1f}x"
              f"{r.gbs:>8.0f}{100 * r.gbs / peak_gbs:>7.1f}%{r.tflops:>9.1f}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zayaserve bench kernels_attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-gbs", type=float, default=3350.0,
                    help="peak HBM bandwidth in GB/s (H100 SXM 3350, H200 4800, MI300X 5300)")
    ap.add_argument("--window", type=int, default=None, help="sliding window (default: none)")
    args = ap.parse_args(argv)
    bench_paged_attention(args.peak_gbs, window=args.window)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
