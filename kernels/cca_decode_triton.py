"""CCA decode step as one Triton launch: the fused version of `cca_decode_ref.cca_decode_ref`
(same arguments, layouts and in-place state updates; see that module for the math).

Everything between the fused q|k|v projection GEMM and the paged-attention call, fused into one
launch: causal depthwise conv, grouped conv, residual paths, QK L2 norm, key temperature and
partial RoPE, plus the in-place update of the conv and delayed-v states.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zayaserve.kernels.cca_decode_ref import _check_args, _inv_freq
from zayaserve.kernels.target_triton import triton_target


def _configs() -> list[triton.Config]:
    """Meta-parameters per target, chosen once at import (the interpreter gets one config)."""
    target = triton_target()
    if target == "interpreter":
        return [triton.Config({"BLOCK_B": 4, "BLOCK_K": 128}, num_warps=4)]  # few, big numpy ops
    if target == "hip":  # 64-wide wavefronts: fewer warps cover the same tile
        return [triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_warps=w, num_stages=1)
                for bb, bk, w in ((1, 64, 2), (2, 64, 2), (4, 32, 2), (4, 64, 4), (8, 32, 4))]
    return [triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_warps=w, num_stages=2)
            for bb, bk, w in ((1, 32, 2), (1, 64, 4), (2, 64, 4), (4, 32, 4), (4, 64, 4),
                              (8, 32, 4), (8, 32, 8), (16, 16, 8))]


@triton.jit
def _residual(proj_ptr, proj_row, b_ok, o, o_ok, q_first, n_q, kv_head,
              Q_SIZE: tl.constexpr, D: tl.constexpr, REP: tl.constexpr):
    """(mean of this group's q heads + its k head) / 2 at output channels `o`."""
    mask = b_ok[:, None] & o_ok[None, :]
    base = proj_ptr + proj_row[:, None] + o[None, :]
    k_cur = tl.load(base + Q_SIZE + kv_head * D, mask=mask, other=0.0).to(tl.float32)
    q_sum = tl.zeros(k_cur.shape, dtype=tl.float32)
    for r in tl.static_range(REP):  # a q head uses 1 row, a k head the REP q heads over it
        q_sum += tl.load(base + (q_first + r) * D, mask=tl.where(r < n_q, mask, False), other=0.0)
    return (q_sum / n_q.to(tl.float32) + k_cur) * 0.5


@triton.autotune(configs=_configs(), key=["B_BUCKET", "D", "HALF", "T0", "T1", "NQ", "NKV"],
                 restore_value=["conv_state_ptr", "v_state_ptr"])  # tuning reruns the step
@triton.jit
def _cca_decode_kernel(
    proj_ptr, conv_state_ptr, v_state_ptr, slots_ptr, positions_ptr,
    dw_weight_ptr, dw_bias_ptr, gw_weight_ptr, gw_bias_ptr, temp_ptr, inv_freq_ptr,
    q_out_ptr, k_out_ptr, v_out_ptr, B, B_BUCKET, proj_stride, eps, sqrt_d,
    NQ: tl.constexpr, NKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr,
    C: tl.constexpr, DV: tl.constexpr, HALF: tl.constexpr, T0: tl.constexpr,
    T1: tl.constexpr, KLEN: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, BLOCK_STATE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: BLOCK_B sequences x one conv group (= one q or k head, D channels). The
    # grouped conv never mixes groups and the L2 norm is per head, so nothing crosses programs.
    g = tl.program_id(1)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    proj_row = offs_b.to(tl.int64) * proj_stride
    slot = tl.load(slots_ptr + offs_b, mask=b_ok, other=0)
    state_row = slot * (KLEN * C)  # int64
    is_q, is_k = g < NQ, g >= NQ
    kv_head = tl.where(is_k, g - NQ, g // REP)
    q_first = tl.where(is_k, (g - NQ) * REP, g)
    n_q = tl.where(is_k, REP, 1)
    ch0 = g * D

    # Output channels in three pieces so RoPE partners sit at the same tile position:
    # a = [0, R/2), b = [R/2, R) and the unrotated rest p = [R, D).
    o_a = tl.arange(0, BLOCK_HALF)
    a_ok = o_a < HALF
    o_b = o_a + HALF
    o_p = 2 * HALF + tl.arange(0, BLOCK_PASS)
    p_ok = o_p < D
    acc_a = tl.zeros((BLOCK_B, BLOCK_HALF), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_B, BLOCK_HALF), dtype=tl.float32)
    acc_p = tl.zeros((BLOCK_B, BLOCK_PASS), dtype=tl.float32)
    # Reduce over (input channel i, grouped tap j) flattened as gw_weight's contiguous k = i*T1+j.
    for k0 in range(0, D * T1, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D * T1
        ch = ch0 + kk // T1
        j = kk % T1
        bk_ok = b_ok[:, None] & k_ok[None, :]
        # Depthwise conv output at grouped tap j reads window rows j .. j+T0-1, where rows < K
        # are the stored state and row K is this token's pre-conv q|k.
        dw = tl.load(dw_bias_ptr + ch, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        for m in tl.static_range(T0):
            from_state = (j + m < KLEN)[None, :]
            x_old = tl.load(conv_state_ptr + state_row[:, None] + ((j + m) * C + ch)[None, :],
                            mask=bk_ok & from_state, other=0.0)
            x_new = tl.load(proj_ptr + proj_row[:, None] + ch[None, :],
                            mask=bk_ok & ~from_state, other=0.0)
            w = tl.load(dw_weight_ptr + ch * T0 + m, mask=k_ok, other=0.0).to(tl.float32)
            dw = dw + tl.where(from_state, x_old, x_new).to(tl.float32) * w[None, :]
        # Grouped conv: acc[b, o] += sum_k dw[b, k] * gw[ch0 + o, k], a [D, D*T1] matvec.
        w_k = gw_weight_ptr + kk[:, None]
        w_a = tl.load(w_k + (ch0 + o_a)[None, :] * (D * T1), mask=k_ok[:, None] & a_ok[None, :],
                      other=0.0).to(tl.float32)
        w_b = tl.load(w_k + (ch0 + o_b)[None, :] * (D * T1), mask=k_ok[:, None] & a_ok[None, :],
                      other=0.0).to(tl.float32)
        w_p = tl.load(w_k + (ch0 + o_p)[None, :] * (D * T1), mask=k_ok[:, None] & p_ok[None, :],
                      other=0.0).to(tl.float32)
        acc_a += tl.sum(dw[:, :, None] * w_a[None, :, :], axis=1)
        acc_b += tl.sum(dw[:, :, None] * w_b[None, :, :], axis=1)
        acc_p += tl.sum(dw[:, :, None] * w_p[None, :, :], axis=1)

    y_a = acc_a + tl.load(gw_bias_ptr + ch0 + o_a, mask=a_ok, other=0.0).to(tl.float32)[None, :]
    y_b = acc_b + tl.load(gw_bias_ptr + ch0 + o_b, mask=a_ok, other=0.0).to(tl.float32)[None, :]
    y_p = acc_p + tl.load(gw_bias_ptr + ch0 + o_p, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    y_a += _residual(proj_ptr, proj_row, b_ok, o_a, a_ok, q_first, n_q, kv_head, NQ * D, D, REP)
    y_b += _residual(proj_ptr, proj_row, b_ok, o_b, a_ok, q_first, n_q, kv_head, NQ * D, D, REP)
    y_p += _residual(proj_ptr, proj_row, b_ok, o_p, p_ok, q_first, n_q, kv_head, NQ * D, D, REP)

    # QK norm to sqrt(D) (masked lanes are exactly 0, so they add nothing), then k's temp.
    sumsq = tl.sum(y_a * y_a, axis=1) + tl.sum(y_b * y_b, axis=1) + tl.sum(y_p * y_p, axis=1)
    factor = tl.div_rn(sqrt_d + tl.zeros_like(sumsq), tl.maximum(tl.sqrt_rn(sumsq), eps))
    temp = tl.load(temp_ptr + tl.maximum(g - NQ, 0), mask=is_k, other=1.0).to(tl.float32)
    y_a = y_a * factor[:, None] * temp
    y_b = y_b * factor[:, None] * temp
    y_p = y_p * factor[:, None] * temp

    # Partial RoPE, angle = position * inv_freq in fp32 as rope_cos_sin computes it.
    pos = tl.load(positions_ptr + offs_b, mask=b_ok, other=0).to(tl.float32)
    angle = pos[:, None] * tl.load(inv_freq_ptr + o_a, mask=a_ok, other=0.0)[None, :]
    cos, sin = tl.cos(angle), tl.sin(angle)
    rot_a = y_a * cos - y_b * sin
    rot_b = y_b * cos + y_a * sin

    # q and k live in separate outputs; the head's kind picks which store is live.
    out_dtype = q_out_ptr.dtype.element_ty
    q_base = q_out_ptr + ((offs_b.to(tl.int64) * NQ + g) * D)[:, None]
    k_base = k_out_ptr + ((offs_b.to(tl.int64) * NKV + kv_head) * D)[:, None]
    # (tl.where, not `&`, joins a scalar condition to a mask: the interpreter mistypes `&`.)
    ab_ok, pp_ok = b_ok[:, None] & a_ok[None, :], b_ok[:, None] & p_ok[None, :]
    tl.store(q_base + o_a[None, :], rot_a.to(out_dtype), mask=tl.where(is_q, ab_ok, False))
    tl.store(q_base + o_b[None, :], rot_b.to(out_dtype), mask=tl.where(is_q, ab_ok, False))
    tl.store(q_base + o_p[None, :], y_p.to(out_dtype), mask=tl.where(is_q, pp_ok, False))
    tl.store(k_base + o_a[None, :], rot_a.to(out_dtype), mask=tl.where(is_k, ab_ok, False))
    tl.store(k_base + o_b[None, :], rot_b.to(out_dtype), mask=tl.where(is_k, ab_ok, False))
    tl.store(k_base + o_p[None, :], y_p.to(out_dtype), mask=tl.where(is_k, pp_ok, False))

    # v of KV head h is elements [h*D, (h+1)*D) of [v_current; previous v_delayed]. Element
    # e >= Dv reads v_state[e - Dv] and is also the one program that writes it (proj column
    # C + e is v_current[e] below Dv and v_delayed[e - Dv] above), so no two programs race.
    ve = kv_head * D + tl.arange(0, BLOCK_D)
    v_ok = b_ok[:, None] & tl.where(is_k, ve < (kv_head + 1) * D, False)[None, :]
    in_prev = (ve >= DV)[None, :]
    v_proj = tl.load(proj_ptr + proj_row[:, None] + C + ve[None, :], mask=v_ok, other=0.0)
    v_state_at = v_state_ptr + (slot * DV)[:, None] + (ve - DV)[None, :]
    v_old = tl.load(v_state_at, mask=v_ok & in_prev, other=0.0)
    tl.store(v_out_ptr + (offs_b.to(tl.int64) * (NKV * D))[:, None] + ve[None, :],
             tl.where(in_prev, v_old, v_proj), mask=v_ok)
    if KLEN > 0:  # next conv state: window rows 1..K, i.e. old rows 1..K-1 then this token
        s = tl.arange(0, BLOCK_STATE)
        s_ok = b_ok[:, None] & (s < KLEN * D)[None, :]
        s_ch = ch0 + s % D
        src_old = (s // D + 1 < KLEN)[None, :]
        shifted = tl.load(conv_state_ptr + state_row[:, None] + ((s // D + 1) * C + s_ch)[None, :],
                          mask=s_ok & src_old, other=0.0)
        current = tl.load(proj_ptr + proj_row[:, None] + s_ch[None, :],
                          mask=s_ok & ~src_old, other=0.0)
    # Threads of this program overwrite state other threads read above: all reads go first.
    tl.debug_barrier()
    tl.store(v_state_at, v_proj, mask=v_ok & in_prev)
    if KLEN > 0:
        tl.store(conv_state_ptr + state_row[:, None] + ((s // D) * C + s_ch)[None, :],
                 tl.where(src_old, shifted, current), mask=s_ok)


def cca_decode_triton(
    proj: torch.Tensor, conv_state: torch.Tensor, v_state: torch.Tensor,
    state_slots: torch.Tensor, positions: torch.Tensor, dw_weight: torch.Tensor,
    dw_bias: torch.Tensor, gw_weight: torch.Tensor, gw_bias: torch.Tensor, temp: torch.Tensor,
    num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, rope_theta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused Triton version of `cca_decode_ref` (same arguments, same in-place updates)."""
    nq, nkv, d = num_heads, num_kv_heads, head_dim
    dims = _check_args(proj, conv_state, v_state, state_slots, positions, dw_weight, dw_bias,
                       gw_weight, gw_bias, temp, nq, nkv, d, rotary_dim)
    tensors = (proj, conv_state, v_state, state_slots, positions, dw_weight, dw_bias,
               gw_weight, gw_bias, temp)
    assert all(t.is_contiguous() for t in tensors), "cca_decode_triton needs contiguous inputs"
    assert all(t.device == proj.device for t in tensors), "all inputs must share one device"
    b = dims.batch
    q = torch.empty(b, nq, d, dtype=proj.dtype, device=proj.device)
    k = torch.empty(b, nkv, d, dtype=proj.dtype, device=proj.device)
    v = torch.empty(b, nkv, d, dtype=proj.dtype, device=proj.device)
    if b == 0:
        return q, k, v
    half, npow2 = rotary_dim // 2, triton.next_power_of_2
    grid = lambda meta: (triton.cdiv(b, meta["BLOCK_B"]), nq + nkv)  # noqa: E731
    _cca_decode_kernel[grid](
        proj, conv_state, v_state, state_slots, positions, dw_weight, dw_bias, gw_weight,
        gw_bias, temp, _inv_freq(rotary_dim, float(rope_theta), proj.device), q, k, v,
        b, min(npow2(b), 1024), proj.stride(0), torch.finfo(proj.dtype).eps, d ** 0.5,
        NQ=nq, NKV=nkv, REP=nq // nkv, D=d, C=dims.channels, DV=dims.v_state, HALF=half,
        T0=dims.t0, T1=dims.t1, KLEN=dims.state_len, BLOCK_HALF=npow2(half),
        BLOCK_PASS=npow2(max(d - 2 * half, 1)), BLOCK_STATE=npow2(max(dims.state_len * d, 1)),
        BLOCK_D=npow2(d),
    )
    return q, k, v


__all__ = ["cca_decode_triton"]
