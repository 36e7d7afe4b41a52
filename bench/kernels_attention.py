"""Paged attention: the Triton kernel vs the torch path, at ZAYA1-8B shapes.

bf16, 8 query heads over 2 KV heads of dim 128, pages of 16 tokens scattered over the cache.
Decode batches of 1/16/64 sequences with contexts of 1k-8k tokens are memory bound: the figure
of merit is the bytes a step must read (every visible K/V row, q, out, block tables) over the
kernel time, against the GPU's HBM bandwidth (nominal and measured). A few chunked-prefill rows
report the fraction of peak FLOP/s. The torch side is the registry's torch kernels
(`paged_attention_torch`, SDPA) with its `AttentionPlan` prebuilt (the engine builds it once per
step for all layers); the Triton output is checked against it before timing. Times are
`triton.testing.do_bench` medians with the L2 flushed between runs; `--dry-run` runs toy shapes
on the CPU under the Triton interpreter (see `zayaserve.bench.kernels`).

    python -m zayaserve.bench.kernels_attention [--dry-run] [--json PATH] [--peak-gbs G]
        [--window W]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from zayaserve.bench.kernel_report import TOL, Report, Row, add_common_args, run_pair, start

NQ, NKV, BLOCK_SIZE = 8, 2, 16  # ZAYA1-8B attention, the engine's page size
HEAD_DIM, TOY_HEAD_DIM = 128, 32


def _make_inputs(q_lens: list[int], ctx_lens: list[int], head_dim: int, device: str,
                 dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(seed)
    per_seq = [-(-c // BLOCK_SIZE) for c in ctx_lens]
    num_blocks = sum(per_seq)
    # Shuffled block ids: a long-running server's pages are scattered, not contiguous.
    ids = torch.randperm(num_blocks, device=device, generator=gen)
    tables = torch.full((len(ctx_lens), max(per_seq)), -1, dtype=torch.int32, device=device)
    start_at = 0
    for s, n in enumerate(per_seq):
        tables[s, :n] = ids[start_at:start_at + n]
        start_at += n
    shape = (num_blocks * BLOCK_SIZE, NKV, head_dim)
    k = torch.randn(shape, device=device, generator=gen).to(dtype)
    v = torch.randn(shape, device=device, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), NQ, head_dim, device=device, generator=gen).to(dtype)
    qs = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    return q, k, v, qs, ctx, tables


def _visible(q_len: int, ctx: int, window: int | None) -> int:
    """Keys summed over the new tokens of one sequence (for FLOPs)."""
    first = ctx - q_len
    return sum(min(p + 1, window or p + 1) for p in range(first, ctx))


def _read_keys(q_len: int, ctx: int, window: int | None) -> int:
    """Distinct cache rows the step must read for one sequence (for bytes)."""
    return ctx if window is None else min(ctx, window + q_len - 1)


def bench_case(report: Report, label: str, q_lens: list[int], ctx_lens: list[int],
               window: int | None) -> Row:
    from zayaserve.kernels.paged_attention_ref import paged_attention_torch, plan_attention
    from zayaserve.kernels.paged_attention_triton import paged_attention_triton

    mode = report.mode
    head_dim = TOY_HEAD_DIM if mode.dry_run else HEAD_DIM
    q, k, v, qs, ctx, tables = _make_inputs(q_lens, ctx_lens, head_dim, mode.device, mode.dtype)
    scale = head_dim**-0.5
    plan = plan_attention(qs.tolist(), ctx.tolist(), tables.long(), BLOCK_SIZE)

    def run_triton() -> torch.Tensor:
        return paged_attention_triton(q, k, v, qs, ctx, tables, BLOCK_SIZE, scale, window)

    def run_torch() -> torch.Tensor:
        return paged_attention_torch(q, k, v, qs, ctx, tables, BLOCK_SIZE, scale, window, plan)

    elem = q.element_size()
    kv_rows = sum(_read_keys(n, c, window) for n, c in zip(q_lens, ctx_lens, strict=True))
    nbytes = (kv_rows * 2 * NKV * head_dim * elem + 2 * q.numel() * elem
              + tables.numel() * tables.element_size())
    flops = sum(4 * NQ * head_dim * _visible(n, c, window)
                for n, c in zip(q_lens, ctx_lens, strict=True))
    row = Row("paged_attention", label, len(q_lens), tol=TOL[mode.dtype], nbytes=nbytes,
              flops=flops)
    return run_pair(report, row, run_triton, run_torch)


def bench_paged_attention(
    report: Report,
    batches: Sequence[int] | None = None,
    contexts: Sequence[int] | None = None,
    window: int | None = None,
) -> list[Row]:
    """One row per case; `None` batches/contexts: the full set, or toy ones in a dry run."""
    dry = report.mode.dry_run
    batches = batches or ((1, 3) if dry else (1, 16, 64))
    contexts = contexts or ((37,) if dry else (1024, 2048, 4096, 8192))
    print(f"paged attention: nq={NQ} nkv={NKV} D={TOY_HEAD_DIM if dry else HEAD_DIM} "
          f"page={BLOCK_SIZE} window={window}")
    cases = [(f"decode B={b} ctx={c}", [1] * b, [c] * b) for b in batches for c in contexts]
    # Chunked prefill: chunks after some context, plus one mixed decode + chunk step.
    if dry:
        cases += [("prefill 2x16 after 32", [16] * 2, [48] * 2),
                  ("mixed 3 decode + 1x16 chunk", [1] * 3 + [16], [40] * 3 + [48])]
    else:
        cases += [("prefill 4x512 after 2k", [512] * 4, [2560] * 4),
                  ("mixed 32 decode + 1x512 chunk", [1] * 32 + [512], [4096] * 32 + [2560])]
    return [bench_case(report, label, q_lens, ctx_lens, window)
            for label, q_lens, ctx_lens in cases]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zayaserve.bench.kernels_attention",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--window", type=int, default=None, help="sliding window (default: none)")
    args = ap.parse_args(argv)
    report = start(args, "zayaserve.bench.kernels_attention", argv)
    if isinstance(report, int):
        return report
    bench_paged_attention(report, window=args.window)
    return report.finish()


if __name__ == "__main__":
    from zayaserve.bench.kernels_attention import main as _main

    raise SystemExit(_main())
