"""KV block encodings (int8 / fp8 e4m3fn, per block and KV head): round-trip error bounds of
the reference, and the Triton kernels (run by the interpreter) against it.

Stated tolerances: quantize is bit-identical (q and scales, both encodings). Dequantize is
bit-identical for fp32/fp16 output; for bf16 output the interpreter truncates fp32->bf16
(GPUs round to nearest even), so there the kernel may be 1 bf16 ulp below the reference.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from zayaserve.kernels.cache_encoding_ref import dequantize_ref, quantize_ref  # noqa: E402
from zayaserve.kernels.cache_encoding_triton import (  # noqa: E402
    dequantize_triton,
    quantize_triton,
)

ENCODINGS = ["int8", "fp8"]
EPS32 = 2.0**-23  # slack for the fp32 divide and multiply around the rounding


def blocks(shape: tuple[int, int, int, int], dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Per-head magnitudes spanning orders of magnitude, like real K/V.
    mag = 10.0 ** torch.randint(-3, 3, (shape[0], 1, shape[2], 1), generator=g).float()
    return (torch.randn(shape, generator=g) * mag).to(dtype)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    view = torch.uint8 if a.dtype == torch.float8_e4m3fn else a.dtype
    assert torch.equal(a.view(view), b.view(view))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    "shape",
    [(3, 16, 1, 16), (2, 16, 2, 64), (2, 8, 4, 128), (1, 5, 2, 24), (2, 64, 1, 128)],
)  # last two: masked tails (bs, D not powers of two) and several BLOCK_S passes
def test_triton_quantize_is_bit_identical(encoding: str, shape) -> None:
    x = blocks(shape, seed=sum(shape))
    q, scales = quantize_triton(x, encoding)
    q_ref, scales_ref = quantize_ref(x, encoding)
    assert_same_bits(q, q_ref)
    assert torch.equal(scales, scales_ref)
    for dtype in (torch.float32, torch.float16):
        assert_same_bits(dequantize_triton(q, scales, encoding, dtype),
                         dequantize_ref(q, scales, encoding, dtype))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_bf16_input_and_output(encoding: str) -> None:
    x = blocks((2, 16, 2, 64), dtype=torch.bfloat16, seed=7)
    q, scales = quantize_triton(x, encoding)
    q_ref, scales_ref = quantize_ref(x, encoding)
    assert_same_bits(q, q_ref)
    assert torch.equal(scales, scales_ref)
    got = dequantize_triton(q, scales, encoding, torch.bfloat16).float()
    want = dequantize_ref(q, scales, encoding, torch.bfloat16).float()
    # Interpreter truncation: never above the reference in magnitude, at most 1 ulp below.
    assert (got.abs() <= want.abs()).all()
    assert ((got - want).abs() <= want.abs() * 2.0**-7).all()


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_non_contiguous_heads(encoding: str) -> None:
    x = blocks((2, 16, 4, 32), seed=3)[:, :, 1:3]  # two of four heads: strided view
    q, scales = quantize_triton(x, encoding)
    q_ref, scales_ref = quantize_ref(x, encoding)
    assert_same_bits(q, q_ref)
    assert torch.equal(scales, scales_ref)


def test_int8_round_trip_within_half_step() -> None:
    x = blocks((4, 16, 2, 64), seed=1)
    q, scales = quantize_ref(x, "int8")
    err = (dequantize_ref(q, scales, "int8", torch.float32) - x).abs()
    bound = scales[:, None, :, None] / 2 + x.abs() * 2 * EPS32
    assert (err <= bound).all()
    assert q.abs().max() == 127  # the largest element of each slice uses the full range


def test_fp8_round_trip_relative_error() -> None:
    x = blocks((4, 16, 2, 64), seed=2)
    q, scales = quantize_ref(x, "fp8")
    err = (dequantize_ref(q, scales, "fp8", torch.float32) - x).abs()
    scale = scales[:, None, :, None]
    # 3 mantissa bits: half an ulp is <= 2**-4 of the value for normals; below 2**-6 (in
    # scaled units) the step is 2**-9, so half a step is 2**-10 * scale.
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10) + x.abs() * 2 * EPS32
    assert (err <= bound).all()


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_zero_blocks_dequantize_to_zero(encoding: str) -> None:
    x = blocks((3, 16, 2, 16), seed=4)
    x[1] = 0.0
    x[2, :, 1] = 0.0
    for quantize, dequantize in ((quantize_ref, dequantize_ref),
                                 (quantize_triton, dequantize_triton)):
        q, scales = quantize(x, encoding)
        assert scales[1].tolist() == [1.0, 1.0] and scales[2, 1] == 1.0
        x_hat = dequantize(q, scales, encoding, torch.float32)
        assert torch.isfinite(x_hat).all()
        assert (x_hat[1] == 0).all() and (x_hat[2, :, 1] == 0).all()


def test_fp8_rounding_every_code_and_tie() -> None:
    """With amax = 448 the scale is exactly 1, so the kernel's fp32->e4m3fn rounding is
    compared with torch's on every representable value, every midpoint (ties to even),
    one fp32 ulp either side of each midpoint, subnormals and signed zeros."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    values = codes.float()
    values = values[torch.isfinite(values)].unique()  # sorted, both signs, drops NaN codes
    mids = (values[1:] + values[:-1]) / 2  # exact in fp32
    ulp = mids.abs() * 2.0**-23
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(512, generator=g) * 10.0 ** torch.randint(-4, 3, (512,), generator=g)
    rand = rand.clamp(-447, 447)
    probe = torch.cat([values, mids, mids + ulp, mids - ulp, rand, torch.tensor([-0.0, 448.0])])
    row = 128
    pad = (-probe.numel()) % row
    x = torch.cat([probe, torch.zeros(pad)]).reshape(1, -1, 1, row)
    q, scales = quantize_triton(x, "fp8")
    q_ref, scales_ref = quantize_ref(x, "fp8")
    assert scales.item() == 1.0 == scales_ref.item()
    assert_same_bits(q, q_ref)
    x_hat = dequantize_triton(q, scales, "fp8", torch.float32)
    assert_same_bits(x_hat, dequantize_ref(q, scales, "fp8", torch.float32))
    assert torch.equal(x_hat.flatten()[: values.numel()], values)  # representables survive


def test_int8_ties_round_half_to_even() -> None:
    halves = torch.arange(-127, 127, dtype=torch.float32) + 0.5
    x = torch.cat([halves, torch.tensor([127.0, -0.0])])  # amax 127: scale exactly 1
    x = torch.cat([x, torch.zeros((-x.numel()) % 64)]).reshape(1, -1, 1, 64)
    q, scales = quantize_triton(x, "int8")
    assert scales.item() == 1.0
    assert torch.equal(q, quantize_ref(x, "int8")[0])
    assert torch.equal(q.flatten()[: halves.numel()], torch.round(halves).to(torch.int8))


@pytest.mark.parametrize("fn", [quantize_ref, quantize_triton])
def test_unknown_encoding_is_named(fn) -> None:
    with pytest.raises(ValueError, match="'int4'"):
        fn(torch.zeros(1, 4, 1, 16), "int4")
    with pytest.raises(ValueError, match="'int4'"):
        dequantize_ref(torch.zeros(1, 4, 1, 16, dtype=torch.int8), torch.ones(1, 1), "int4",
                       torch.float32)


def test_references_import_without_triton() -> None:
    """CPU-only torch wheels have no triton: the references must still import and run."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from zayaserve.kernels import cache_encoding_ref as ce, fused_moe_ref as fm\n"
        "q, s = ce.quantize_ref(torch.randn(1, 4, 1, 8), 'int8')\n"
        "fm.fused_moe_ref(torch.randn(2, 8), torch.tensor([0, -1]), torch.ones(2),\n"
        "                 torch.randn(1, 8, 8), torch.randn(1, 8, 4))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_registry_resolves_both_backends() -> None:
    from zayaserve.kernels.registry import get_op

    assert get_op("kv_quantize", "torch") is quantize_ref
    assert get_op("kv_quantize", "triton") is quantize_triton
    assert get_op("kv_dequantize", "torch") is dequantize_ref
    assert get_op("kv_dequantize", "triton") is dequantize_triton
