"""Kernel benchmarks: each Triton kernel against its torch reference at ZAYA1-8B shapes (bf16)
on a CUDA or ROCm GPU, timed with `triton.testing.do_bench` (medians, L2 flushed). Each pair is
checked first (allclose at a tolerance fit for the dtype; kv_quantize must be bit-identical):
a mismatch or a crash is reported, the rest still runs, and the exit status is 1.

HBM fractions are given against the nominal peak (--peak-gbs, else looked up from the device
name) and against the copy bandwidth measured here (a 1 GiB device-to-device `copy_`, 2 bytes
moved per byte copied). Targets (printed, never enforced): fused MoE >= 2x the reference at
>= 64 tokens; decode attention >= 60% of the measured bandwidth (at the decode case that reads
the most bytes, where the step is bandwidth bound).

`--dry-run` runs the same code paths on the CPU at toy shapes in fp32, the kernels under
Triton's interpreter (the command reruns itself with TRITON_INTERPRET=1 if it is not set) and
timed with a plain `time.perf_counter` loop: it proves the harness, not the speed.

    python -m zayaserve.bench.kernels [--dry-run] [--json PATH] [--peak-gbs G] [--peak-tflops T]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial

import torch

from zayaserve.bench.kernel_report import TOL, Report, Row, add_common_args, run_pair, start


def bench_fused_moe(report: Report) -> list[Row]:
    from zayaserve.kernels.fused_moe_ref import fused_moe_ref
    from zayaserve.kernels.fused_moe_triton import fused_moe_triton

    mode = report.mode
    dev, dt = mode.device, mode.dtype
    # ZAYA1-8B: hidden 2048, expert width 2048, 16 experts; toy: not powers of two (masking).
    hid, inter, experts = (64, 48, 4) if mode.dry_run else (2048, 2048, 16)
    token_counts = (5, 64) if mode.dry_run else (1, 16, 64, 256, 2048)
    torch.manual_seed(0)
    # Scaled so the outputs are O(1): the bf16 tolerance then reads as a few ulps.
    gate_up = (torch.randn(experts, 2 * inter, hid, device=dev) / hid**0.5).to(dt)
    down = (torch.randn(experts, hid, inter, device=dev) / inter**0.5).to(dt)
    rows = []
    for tokens in token_counts:
        hidden = torch.randn(tokens, hid, device=dev).to(dt)
        expert_rows = torch.randint(-1, experts, (tokens,), device=dev)  # ~1/(E+1) skipped
        weights = torch.rand(tokens, device=dev).to(dt)
        args = (hidden, expert_rows, weights, gate_up, down)
        hit = int(torch.unique(expert_rows[expert_rows >= 0]).numel())
        routed = int((expert_rows >= 0).sum())
        elem = hidden.element_size()
        row = Row("fused_moe", f"T={tokens}", tokens, tol=TOL[dt],
                  nbytes=hit * 3 * hid * inter * elem + 2 * tokens * hid * elem,
                  flops=2 * 3 * hid * inter * routed)
        rows.append(run_pair(report, row, partial(fused_moe_triton, *args),
                             partial(fused_moe_ref, *args)))
    return rows


def bench_cache_encoding(report: Report) -> list[Row]:
    from zayaserve.kernels.cache_encoding_ref import quantize_ref
    from zayaserve.kernels.cache_encoding_triton import quantize_triton

    mode = report.mode
    # 40 layers x 64 blocks of 16 tokens, 2 KV heads of 128 (toy: 8 blocks, head dim 16).
    shape = (8, 16, 2, 16) if mode.dry_run else (40 * 64, 16, 2, 128)
    torch.manual_seed(0)
    x = torch.randn(shape, device=mode.device).to(mode.dtype)
    rows = []
    for enc in ("int8", "fp8"):
        # The contract is bit-identical codes and scales: tolerance 0.
        row = Row("kv_quantize", f"{enc} {'x'.join(map(str, shape))}", shape[0], tol=0.0,
                  nbytes=x.numel() * (x.element_size() + 1) + shape[0] * shape[2] * 4)
        rows.append(run_pair(report, row, partial(quantize_triton, x, enc),
                             partial(quantize_ref, x, enc)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zayaserve.bench.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    args = ap.parse_args(argv)
    report = start(args, "zayaserve.bench.kernels", argv)
    if isinstance(report, int):
        return report
    from zayaserve.bench.kernels_attention import bench_paged_attention
    from zayaserve.bench.kernels_cca import bench_cca_decode

    bench_fused_moe(report)
    bench_paged_attention(report)
    bench_cca_decode(report)
    bench_cache_encoding(report)
    return report.finish()


if __name__ == "__main__":
    # Through the package, so the sub-benches and this run share one module (not __main__).
    from zayaserve.bench.kernels import main as _main

    raise SystemExit(_main())
