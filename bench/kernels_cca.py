"""CCA decode: the fused Triton kernel vs the torch reference, at ZAYA1-8B shapes.

bf16, 8 query heads and 2 KV heads of dim 128 (1280 conv channels, 10 conv groups), conv kernels
t0 = t1 = 2, partial RoPE on half of each head, state slots scattered over a pool twice the batch.
One decode token per sequence, batches of 1/16/64/256. The step is tiny and memory/latency
bound; the bytes are those it must touch once (conv weights, proj, states read and written,
outputs). Before timing, both sides run one step from identical copies of the states: q, k, v
and the updated conv and v states must match. Times are `triton.testing.do_bench` medians; both
sides move the states forward on every call, which changes values but not the work.
`--dry-run` runs toy shapes on the CPU under the Triton interpreter (see
`zayaserve.bench.kernels`).

    python -m zayaserve.bench.kernels_cca [--dry-run] [--json PATH] [--batch 1 16 64 256]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from zayaserve.bench.kernel_report import (
    Mode,
    Report,
    Row,
    add_common_args,
    compare,
    run_pair,
    start,
)

T0, T1 = 2, 2
# (nq, nkv, head_dim): ZAYA1-8B's CCA, and a toy one for the dry run. RoPE on half of each head.
FULL, TOY = (8, 2, 128), (4, 2, 16)
THETA = 5_000_000.0  # the `hybrid` layer type
# The tests' tolerances: the bf16 reference rounds after every op, the kernel once.
TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


def _make_inputs(batch: int, mode: Mode, seed: int = 0) -> dict[str, Any]:
    nq, nkv, d = TOY if mode.dry_run else FULL
    dev, dt = mode.device, mode.dtype
    gen = torch.Generator(device=dev).manual_seed(seed)
    c, dv, k = (nq + nkv) * d, nkv * d // 2, (T0 - 1) + (T1 - 1)
    slots = 2 * batch

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, device=dev, generator=gen) * scale).to(dt)

    return dict(
        proj=randn(batch, c + 2 * dv), conv_state=randn(slots, k, c), v_state=randn(slots, dv),
        state_slots=torch.randperm(slots, device=dev, generator=gen)[:batch],
        positions=torch.randint(0, 131_072, (batch,), device=dev, generator=gen),
        dw_weight=randn(c, 1, T0, scale=T0**-0.5), dw_bias=randn(c, scale=0.05),
        gw_weight=randn(c, d, T1, scale=(d * T1) ** -0.5),
        gw_bias=randn(c, scale=0.05), temp=randn(nkv, scale=0.1).float().exp().to(dt),
        num_heads=nq, num_kv_heads=nkv, head_dim=d, rotary_dim=d // 2, rope_theta=THETA)


def _bytes_touched(args: dict[str, Any]) -> int:
    proj = args["proj"]
    b, item = proj.shape[0], proj.element_size()
    weights = sum(args[n].numel() for n in ("dw_weight", "dw_bias", "gw_weight", "gw_bias"))
    states = 2 * b * (args["conv_state"][0].numel() + args["v_state"][0].numel())  # read+write
    outputs = b * (args["num_heads"] + 2 * args["num_kv_heads"]) * args["head_dim"]
    return item * (weights + proj.numel() + states + outputs)


def _check(args: dict[str, Any], tol: float) -> tuple[float, bool]:
    """One step of each side from the same states: outputs and new states must agree."""
    from zayaserve.kernels.cca_decode_ref import cca_decode_ref
    from zayaserve.kernels.cca_decode_triton import cca_decode_triton

    def fresh() -> dict[str, Any]:
        return {**args, "conv_state": args["conv_state"].clone(),
                "v_state": args["v_state"].clone()}

    tri, ref = fresh(), fresh()
    got = (*cca_decode_triton(**tri), tri["conv_state"], tri["v_state"])
    want = (*cca_decode_ref(**ref), ref["conv_state"], ref["v_state"])
    return compare(got, want, tol)


def bench_cca_decode(report: Report, batch_sizes: Sequence[int] | None = None) -> list[Row]:
    """One row per batch size; `None`: 1/16/64/256, or toy ones in a dry run."""
    from zayaserve.kernels.cca_decode_ref import cca_decode_ref
    from zayaserve.kernels.cca_decode_triton import cca_decode_triton

    mode = report.mode
    batch_sizes = batch_sizes or ((1, 5) if mode.dry_run else (1, 16, 64, 256))
    nq, nkv, d = TOY if mode.dry_run else FULL
    print(f"CCA decode: nq={nq} nkv={nkv} D={d} t0={T0} t1={T1}")
    rows = []
    for b in batch_sizes:
        args = _make_inputs(b, mode)
        row = Row("cca_decode", f"B={b}", b, tol=TOL[mode.dtype], nbytes=_bytes_touched(args))
        rows.append(run_pair(report, row, partial(cca_decode_triton, **args),
                             partial(cca_decode_ref, **args), partial(_check, args, row.tol)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zayaserve.bench.kernels_cca",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    args = ap.parse_args(argv)
    report = start(args, "zayaserve.bench.kernels_cca", argv)
    if isinstance(report, int):
        return report
    bench_cca_decode(report, args.batch)
    return report.finish()


if __name__ == "__main__":
    from zayaserve.bench.kernels_cca import main as _main

    raise SystemExit(_main())
