"""Kernel benchmarks at ZAYA1-8B shapes (bf16), each Triton kernel against its torch reference
with `triton.testing.do_bench`: milliseconds, the ratio, and the achieved fraction of peak
memory bandwidth (or FLOP/s for prefill-like shapes). Needs a CUDA or ROCm GPU.

    python -m zayaserve.bench.kernels [--peak-gbs 3350] [--peak-tflops 989]
    (H100 SXM: 3350 GB/s, 989 dense bf16 TFLOP/s; MI300X: 5300 GB/s, 1307 TFLOP/s)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

H, I, E = 2048, 2048, 16  # ZAYA1-8B hidden, expert width, experts
NKV, D = 2, 128


def _bench(fn: object) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))  # type: ignore[arg-type]


def bench_fused_moe(peak_gbs: float, peak_tflops: float) -> None:
    from zayaserve.kernels.fused_moe_ref import fused_moe_ref
    from zayaserve.kernels.fused_moe_triton import fused_moe_triton

    dev, dt = "cuda", torch.bfloat16
    gate_up = torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02
    down = torch.randn(E, H, I, device=dev, dtype=dt) * 0.02
    for tokens in (1, 16, 64, 256, 2048):
        hidden = torch.randn(tokens, H, device=dev, dtype=dt)
        rows = torch.randint(-1, E, (tokens,), device=dev)  # about 1/17 skipped
        weights = torch.rand(tokens, device=dev, dtype=dt)
        args = (hidden, rows, weights, gate_up, down)
        t_tri = _bench(lambda a=args: fused_moe_triton(*a))  # type: ignore[misc]
        t_ref = _bench(lambda a=args: fused_moe_ref(*a))  # type: ignore[misc]
        hit = int(torch.unique(rows[rows >= 0]).numel())
        bytes_moved = hit * 3 * H * I * 2 + 2 * tokens * H * 2
        flops = 2 * 3 * H * I * int((rows >= 0).sum())
        print(f"fused_moe T={tokens:5d}: triton {t_tri:7.3f} ms  torch {t_ref:7.3f} ms  "
              f"x{t_ref / t_tri:5.2f}  {bytes_moved / t_tri / 1e6 / peak_gbs:6.1%} of HBM  "
              f"{flops / t_tri / 1e9 / peak_tflops:6.1%} of peak FLOP/s")


def bench_cache_encoding(peak_gbs: float) -> None:
    from zayaserve.kernels.cache_encoding_ref import quantize_ref
    from zayaserve.kernels.cache_encoding_triton import quantize_triton

    x = torch.randn(40 * 64, 16, NKV, D, device="cuda", dtype=torch.bfloat16)
    for enc in ("int8", "fp8"):
        t_tri = _bench(lambda e=enc: quantize_triton(x, e))  # type: ignore[misc]
        t_ref = _bench(lambda e=enc: quantize_ref(x, e))  # type: ignore[misc]
        moved = x.numel() * 3  # read bf16, write 1 byte
        print(f"kv_quantize {enc}: triton {t_tri:7.3f} ms  torch {t_ref:7.3f} ms  "
              f"x{t_ref / t_tri:5.2f}  {moved / t_tri / 1e6 / peak_gbs:6.1%} of HBM")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-gbs", type=float, default=3350.0)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA or ROCm GPU; on the CPU the kernels are proven "
                 "correct by their tests under TRITON_INTERPRET=1, not timed.")
    from zayaserve.bench.kernels_attention import bench_paged_attention
    from zayaserve.bench.kernels_cca import bench_cca_decode

    bench_fused_moe(args.peak_gbs, args.peak_tflops)
    bench_paged_attention(peak_gbs=args.peak_gbs)
    bench_cca_decode()
    bench_cache_encoding(args.peak_gbs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
