"""KV block encodings for the Redis prefix cache: symmetric int8 / fp8 (e4m3fn) per block and
per KV head, the torch reference. This module never imports triton; `cache_encoding_triton`
holds Triton kernels that give bit-identical results.

x [N, block_size, nkv, D] -> q (same shape; int8, or torch.float8_e4m3fn) and scales [N, nkv]
fp32, scale = amax / QMAX over the (block, head) slice (QMAX 127 for int8, 448 for fp8; an
all-zero slice gets scale 1 so it dequantizes to zeros, not NaN). q = round(x / scale) clamped
to [-QMAX, QMAX]: round-half-even to an integer for int8, to the nearest e4m3fn value (ties to
even) for fp8. Dequantize: q * scale in fp32, cast to the requested dtype. Inputs must be
finite: a NaN/inf slice has no meaningful scale.
"""

from __future__ import annotations

import torch

QMAX = {"int8": 127.0, "fp8": 448.0}
QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def _qmax(encoding: str) -> float:
    if encoding not in QMAX:
        raise ValueError(f"unknown KV cache encoding {encoding!r}; known: {sorted(QMAX)}")
    return QMAX[encoding]


def quantize_ref(x: torch.Tensor, encoding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, bs, nkv, D] -> (q [N, bs, nkv, D], scales [N, nkv] fp32)."""
    qmax = _qmax(encoding)
    assert x.dim() == 4, f"x must be [N, block_size, nkv, D], got {tuple(x.shape)}"
    xf = x.float()
    amax = xf.abs().amax(dim=(1, 3))  # [N, nkv]
    scales = amax / qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    v = (xf / scales[:, None, :, None]).clamp(-qmax, qmax)
    q = v.round().to(torch.int8) if encoding == "int8" else v.to(torch.float8_e4m3fn)
    return q, scales


def dequantize_ref(
    q: torch.Tensor, scales: torch.Tensor, encoding: str, dtype: torch.dtype
) -> torch.Tensor:
    """(q [N, bs, nkv, D], scales [N, nkv]) -> x_hat [N, bs, nkv, D] in `dtype`."""
    _qmax(encoding)
    assert q.dtype == QDTYPE[encoding], f"{encoding} data must be {QDTYPE[encoding]}, got {q.dtype}"
    return (q.float() * scales.float()[:, None, :, None]).to(dtype)
