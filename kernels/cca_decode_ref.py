"""CCA decode step, torch reference: one new token per sequence, from the fused projection to
rotated q/k and v. This module never imports triton; `cca_decode_triton` is the fused kernel.

Everything between the fused q|k|v projection GEMM and the paged-attention call: causal
depthwise conv, grouped conv, residual paths, QK L2 norm, key temperature and partial RoPE,
plus the in-place update of the conv and delayed-v states. `cca_decode_ref` repeats, op for op,
what `CCAProjection.forward` -> `qk_l2_norm` -> `apply_partial_rope` compute for a step in which
every sequence has exactly one token.

Layouts (B decode tokens, C = nq*D + nkv*D conv channels, Dv = nkv*D/2, K = (t0-1)+(t1-1)):
  proj [B, C + 2*Dv] columns q | k | v_current | v_delayed; conv_state [slots, K, C];
  v_state [slots, Dv]; dw_weight [C, 1, t0]; gw_weight [C, D, t1] (G = nq + nkv groups of D).
`state_slots` must not repeat (each sequence owns its slot), as in the engine.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch


class CCADims(NamedTuple):
    batch: int
    channels: int  # C
    v_state: int  # Dv
    state_len: int  # K
    t0: int
    t1: int


def _check_args(proj: torch.Tensor, conv_state: torch.Tensor, v_state: torch.Tensor,
                state_slots: torch.Tensor, positions: torch.Tensor, dw_weight: torch.Tensor,
                dw_bias: torch.Tensor, gw_weight: torch.Tensor, gw_bias: torch.Tensor,
                temp: torch.Tensor, nq: int, nkv: int, d: int, rotary_dim: int) -> CCADims:
    assert nq % nkv == 0 and (nkv * d) % 2 == 0, "GQA heads or v halves do not divide"
    assert rotary_dim % 2 == 0 and 2 <= rotary_dim <= d, f"bad rotary_dim {rotary_dim}"
    b, c, dv = proj.shape[0], (nq + nkv) * d, nkv * d // 2
    t0, t1 = dw_weight.shape[-1], gw_weight.shape[-1]
    k = conv_state.shape[1]
    assert proj.shape == (b, c + 2 * dv), f"proj {tuple(proj.shape)}, want [{b}, {c + 2 * dv}]"
    assert k == t0 + t1 - 2 and conv_state.shape[2] == c, f"conv_state {conv_state.shape}"
    assert v_state.shape[1:] == (dv,), f"v_state {tuple(v_state.shape)}, want [slots, {dv}]"
    assert dw_weight.shape == (c, 1, t0) and gw_weight.shape == (c, d, t1), "conv weights"
    assert dw_bias.shape == (c,) and gw_bias.shape == (c,) and temp.shape == (nkv,)
    for name, idx in (("state_slots", state_slots), ("positions", positions)):
        assert idx.shape == (b,) and idx.dtype == torch.int64, f"{name} must be int64 [{b}]"
    assert proj.is_floating_point(), "proj must be a float tensor"
    assert conv_state.dtype == v_state.dtype == proj.dtype, "states must have proj's dtype"
    return CCADims(b, c, dv, k, t0, t1)


@functools.cache
def _inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """rope_cos_sin's inverse frequencies, bit for bit: same expression, pow on the CPU.

    The kernel could evaluate theta^(-2i/R) itself, but one ulp of difference in a frequency
    becomes ~pos * 6e-8 rad of angle: at position 1e5 that is a visible error. Everything after
    (position * inv_freq in fp32, cos, sin) is computed in the kernel.
    """
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim
    return 1.0 / (theta ** exponent).to(device)


def cca_decode_ref(
    proj: torch.Tensor, conv_state: torch.Tensor, v_state: torch.Tensor,
    state_slots: torch.Tensor, positions: torch.Tensor, dw_weight: torch.Tensor,
    dw_bias: torch.Tensor, gw_weight: torch.Tensor, gw_bias: torch.Tensor, temp: torch.Tensor,
    num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, rope_theta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference; returns q [B, nq, D], k [B, nkv, D], v [B, nkv, D]."""
    nq, nkv, d = num_heads, num_kv_heads, head_dim
    dims = _check_args(proj, conv_state, v_state, state_slots, positions, dw_weight, dw_bias,
                       gw_weight, gw_bias, temp, nq, nkv, d, rotary_dim)
    b, c, t0, t1 = dims.batch, dims.channels, dims.t0, dims.t1
    q, k, v_cur, v_del = proj.split([nq * d, nkv * d, dims.v_state, dims.v_state], dim=-1)
    q_res = (q.view(b, nq, d) + k.view(b, nkv, d).repeat_interleave(nq // nkv, dim=1)) * 0.5
    k_res = q_res.view(b, nkv, nq // nkv, d).mean(dim=2)

    # The window of each token: its sequence's K stored columns, then its own q|k.
    window = torch.cat([conv_state[state_slots], proj[:, None, :c]], dim=1)  # [B, K+1, C]
    w0 = dw_weight[:, 0, :]  # [C, t0]
    dw = dw_bias + window[:, 0:t1, :] * w0[:, 0]
    for m in range(1, t0):
        dw = dw + window[:, m:m + t1, :] * w0[:, m]  # [B, t1, C]
    groups = nq + nkv
    w1 = gw_weight.view(groups, d, d, t1)  # [G, out, in, t1]
    mixed = torch.einsum("tjgi,goij->tgo", dw.view(b, t1, groups, d), w1).reshape(b, -1)
    mixed = mixed + gw_bias  # [B, C]
    if dims.state_len > 0:
        conv_state[state_slots] = window[:, 1:]
    query = mixed[:, :nq * d].view(b, nq, d) + q_res
    key = mixed[:, nq * d:].view(b, nkv, d) + k_res
    v_prev = v_state[state_slots]  # a copy, read before the state moves on
    v_state[state_slots] = v_del
    value = torch.cat([v_cur, v_prev], dim=-1).view(b, nkv, d)

    scale, eps = d ** 0.5, torch.finfo(proj.dtype).eps
    query = query * (scale / query.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
    key = key * (scale / key.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
    key = key * temp[None, :, None]

    freqs = positions[:, None].float() * _inv_freq(rotary_dim, rope_theta, proj.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(proj.dtype)[:, None, :], emb.sin().to(proj.dtype)[:, None, :]
    half = rotary_dim // 2

    def rope(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)

    return rope(query), rope(key), value


__all__ = ["CCADims", "cca_decode_ref"]
