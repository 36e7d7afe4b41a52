"""KV block encodings (int8 / fp8 e4m3fn per block and KV head) as Triton kernels, bit-identical
to the torch reference in `cache_encoding_ref` (which states the encoding).

Why the kernels compute bit patterns themselves instead of casting: the Triton interpreter's
fp32->fp8 cast rounds half away from zero and can carry a mantissa overflow into the wrong
exponent bit, and MI300X (gfx942) has no native e4m3fn conversion; integer bit arithmetic is
exact on every target and matches torch's `to(torch.float8_e4m3fn)` bit for bit. Division
uses `div_rn` because Triton lowers `/` on fp32 to the approximate `div.full.f32` on NVIDIA.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from zayaserve.kernels.cache_encoding_ref import QDTYPE, _qmax
from zayaserve.kernels.target_triton import triton_target

_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _configs() -> list[Any]:
    """Memory-bound kernels: only the warp count is worth tuning."""
    target = triton_target()
    if target == "cuda":
        return [triton.Config({}, num_warps=w) for w in (2, 4, 8)]
    if target == "hip":  # 64-wide wavefronts: fewer warps cover the same tile
        return [triton.Config({}, num_warps=w) for w in (1, 2, 4)]
    return [triton.Config({}, num_warps=4)]


@triton.jit
def _round_to_int(v):
    # Adding 1.5 * 2**23 leaves no fraction bits, so the fp32 add itself rounds half to
    # even; reading the bits back avoids a float subtraction a compiler could fold away.
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _fp8_e4m3fn_bits(v):
    """Bits of the e4m3fn value nearest to v (ties to even); |v| <= 448 is assumed."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # Normal range: drop 20 of fp32's 23 mantissa bits with round-half-even (a carry
    # correctly bumps the exponent), then rebias the exponent from 127 to 7.
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    # Below 2**-6 e4m3fn is subnormal with a fixed step of 2**-9: count steps, rounded
    # half-even by one fp32 add at magnitude 2**23.
    steps = mag.to(tl.float32, bitcast=True) * 512.0 + 8388608.0
    subnormal = steps.to(tl.int32, bitcast=True) - 0x4B000000
    return tl.where(mag < 0x3C800000, subnormal, normal) | sign


@triton.jit
def _fp8_e4m3fn_value(bits):
    """fp32 value of e4m3fn bits given as int32 in [0, 255] (exact; 0x7F/0xFF are NaN)."""
    exp = (bits >> 3) & 0xF
    mant = bits & 0x7
    normal = ((exp + 127 - 7) << 23) | (mant << 20)
    normal = tl.where((bits & 0x7F) == 0x7F, 0x7FC00000, normal)  # quiet NaN
    subnormal = mant.to(tl.float32) * 0.001953125  # mant * 2**-9
    mag = tl.where(exp == 0, subnormal, normal.to(tl.float32, bitcast=True))
    return tl.where((bits & 0x80) != 0, -mag, mag)


@triton.autotune(configs=_configs(), key=["BS", "D", "IS_FP8"])
@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr,
    BS, NKV, D,
    stride_xn, stride_xs, stride_xh,
    QMAX_: tl.constexpr, IS_FP8: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # one program per (block, head): scales are per (block, head)
    n = pid // NKV
    h = pid % NKV
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x_base = x_ptr + n.to(tl.int64) * stride_xn + h * stride_xh
    q_base = q_ptr + n.to(tl.int64) * BS * NKV * D + h * D  # q is contiguous
    # Pass 1: amax over the slice, BLOCK_S tokens at a time (bounded registers for big
    # blocks; the second read is served from L2).
    amax = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, BS, BLOCK_S):
        rows = s0 + offs_s
        mask = (rows < BS)[:, None] & d_ok[None, :]
        x = tl.load(x_base + rows[:, None] * stride_xs + offs_d[None, :], mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.math.div_rn(tl.max(tl.max(amax, axis=1), axis=0), QMAX_)
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(scale_ptr + pid, scale)
    # Pass 2: quantize.
    for s0 in range(0, BS, BLOCK_S):
        rows = s0 + offs_s
        mask = (rows < BS)[:, None] & d_ok[None, :]
        x = tl.load(x_base + rows[:, None] * stride_xs + offs_d[None, :], mask=mask, other=0.0)
        v = tl.math.div_rn(x.to(tl.float32), scale)
        v = tl.minimum(tl.maximum(v, -QMAX_), QMAX_)
        code = _fp8_e4m3fn_bits(v) if IS_FP8 else _round_to_int(v)
        dst = q_base + rows[:, None] * (NKV * D) + offs_d[None, :]
        tl.store(dst, code.to(q_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(), key=["BS", "D", "IS_FP8"])
@triton.jit
def _dequantize_kernel(
    q_ptr, scale_ptr, out_ptr,
    BS, NKV, D,
    IS_FP8: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // NKV
    h = pid % NKV
    scale = tl.load(scale_ptr + pid)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    base = n.to(tl.int64) * BS * NKV * D + h * D  # q and out are both contiguous
    for s0 in range(0, BS, BLOCK_S):
        rows = s0 + offs_s
        mask = (rows < BS)[:, None] & d_ok[None, :]
        offs = base + rows[:, None] * (NKV * D) + offs_d[None, :]
        code = tl.load(q_ptr + offs, mask=mask, other=0)
        v = _fp8_e4m3fn_value(code.to(tl.int32) & 0xFF) if IS_FP8 else code.to(tl.float32)
        tl.store(out_ptr + offs, (v * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _tile(block_size: int, head_dim: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(head_dim)
    block_s = min(triton.next_power_of_2(block_size), max(1, 4096 // block_d))
    return block_s, block_d


def quantize_triton(x: torch.Tensor, encoding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `quantize_ref`; bit-identical q and scales."""
    qmax = _qmax(encoding)
    assert x.dim() == 4, f"x must be [N, block_size, nkv, D], got {tuple(x.shape)}"
    assert x.dtype in _IN_DTYPES, f"x dtype {x.dtype} unsupported"
    assert x.stride(3) == 1, "x must be contiguous along head_dim"
    num_blocks, block_size, nkv, head_dim = x.shape
    q = torch.empty(x.shape, dtype=QDTYPE[encoding], device=x.device)
    scales = torch.empty(num_blocks, nkv, dtype=torch.float32, device=x.device)
    if q.numel() == 0:
        return q, scales.fill_(1.0)
    is_fp8 = encoding == "fp8"
    block_s, block_d = _tile(block_size, head_dim)
    # fp8 bits go through a uint8 view: the kernel writes the bit pattern it computed.
    _quantize_kernel[(num_blocks * nkv,)](
        x, q.view(torch.uint8) if is_fp8 else q, scales,
        block_size, nkv, head_dim,
        x.stride(0), x.stride(1), x.stride(2),
        QMAX_=qmax, IS_FP8=is_fp8, BLOCK_S=block_s, BLOCK_D=block_d,
    )
    return q, scales


def dequantize_triton(
    q: torch.Tensor, scales: torch.Tensor, encoding: str, dtype: torch.dtype
) -> torch.Tensor:
    """Same contract as `dequantize_ref`; bit-identical on GPUs (see the test for the
    interpreter's fp32->bf16 cast)."""
    _qmax(encoding)
    assert q.dtype == QDTYPE[encoding], f"{encoding} data must be {QDTYPE[encoding]}, got {q.dtype}"
    assert q.dim() == 4 and q.is_contiguous(), "q must be a contiguous [N, block_size, nkv, D]"
    num_blocks, block_size, nkv, head_dim = q.shape
    assert scales.shape == (num_blocks, nkv), f"scales {tuple(scales.shape)}"
    assert dtype in _IN_DTYPES, f"output dtype {dtype} unsupported"
    scales = scales.float().contiguous()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    is_fp8 = encoding == "fp8"
    block_s, block_d = _tile(block_size, head_dim)
    _dequantize_kernel[(num_blocks * nkv,)](
        q.view(torch.uint8) if is_fp8 else q, scales, out,
        block_size, nkv, head_dim,
        IS_FP8=is_fp8, BLOCK_S=block_s, BLOCK_D=block_d,
    )
    return out
