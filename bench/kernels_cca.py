"""CCA decode: the fused Triton kernel vs the torch reference, at ZAYA1-8B shapes.

bf16, 8 query heads and 2 KV heads of dim 128 (1280 conv channels, 10 conv groups), conv kernels
t0 = t1 = 2, partial RoPE on half of each head, state slots scattered over a pool twice the batch.
One decode token per sequence, batches of 1/16/64/256. The step is tiny and memory/latency
bound; GB/s counts the bytes it must touch once (conv weights, proj, states read and written,
outputs). Times are `triton.testing.do_bench` medians; both sides move the states forward on
every call, which changes values but not the work.

    python -m zayaserve.bench.kernels_cca [--batch 1 16 64 256]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

NQ, NKV, HEAD_DIM, T0, T1 = 8, 2, 128, 2, 2  # ZAYA1-8B's CCA
ROTARY_DIM, THETA = HEAD_DIM // 2, 5_000_000.0  # the `hybrid` layer type


def _make_inputs(batch: int, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    c, dv, k = (NQ + NKV) * HEAD_DIM, NKV * HEAD_DIM // 2, (T0 - 1) + (T1 - 1)
    slots = 2 * batch

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(shape, device="cuda", generator=gen) * scale
        return x.to(torch.bfloat16)

    return dict(
        proj=randn(batch, c + 2 * dv), conv_state=randn(slots, k, c), v_state=randn(slots, dv),
        state_slots=torch.randperm(slots, device="cuda", generator=gen)[:batch],
        positions=torch.randint(0, 131_072, (batch,), device="cuda", generator=gen),
        dw_weight=randn(c, 1, T0, scale=T0**-0.5), dw_bias=randn(c, scale=0.05),
        gw_weight=randn(c, HEAD_DIM, T1, scale=(HEAD_DIM * T1) ** -0.5),
        gw_bias=randn(c, scale=0.05), temp=randn(NKV, scale=0.1).float().exp().bfloat16(),
        num_heads=NQ, num_kv_heads=NKV, head_dim=HEAD_DIM, rotary_dim=ROTARY_DIM,
        rope_theta=THETA)


def _bytes_touched(args: dict) -> int:
    b, item = args["proj"].shape[0], 2
    weights = sum(args[n].numel() for n in ("dw_weight", "dw_bias", "gw_weight", "gw_bias"))
    states = 2 * b * (args["conv_state"][0].numel() + args["v_state"][0].numel())  # read+write
    outputs = b * (NQ + 2 * NKV) * HEAD_DIM
    return item * (weights + args["proj"].numel() + states + outputs)


def bench_cca_decode(batch_sizes: Sequence[int] = (1, 16, 64, 256)) -> None:
    """Prints kernel vs reference milliseconds and their ratio per batch size."""
    if not torch.cuda.is_available():
        sys.exit("bench_cca_decode needs a CUDA or ROCm GPU (torch.cuda.is_available() is "
                 "False); the kernel's correctness tests run on the CPU via TRITON_INTERPRET=1.")
    from triton.testing import do_bench

    from zayaserve.kernels.cca_decode_ref import cca_decode_ref
    from zayaserve.kernels.cca_decode_triton import cca_decode_triton

    print(f"CCA decode, bf16, nq={NQ} nkv={NKV} D={HEAD_DIM} t0={T0} t1={T1} "
          f"on {torch.cuda.get_device_name()}")
    print(f"{'batch':>6} {'triton ms':>10} {'torch ms':>10} {'speedup':>8} {'triton GB/s':>12}")
    for b in batch_sizes:
        args = _make_inputs(b)
        cca_decode_triton(**args)  # compile and autotune outside the timed region
        tri_ms = do_bench(lambda args=args: cca_decode_triton(**args))
        ref_ms = do_bench(lambda args=args: cca_decode_ref(**args))
        gbs = _bytes_touched(args) / (tri_ms * 1e-3) / 1e9
        print(f"{b:>6} {tri_ms:>10.4f} {ref_ms:>10.4f} {ref_ms / tri_ms:>7.1f}x {gbs:>12.1f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    bench_cca_decode(parser.parse_args(argv).batch)


if __name__ == "__main__":
    main()
