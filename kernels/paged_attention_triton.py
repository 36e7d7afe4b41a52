"""GQA attention over a paged KV cache: one Triton kernel for decode and chunked prefill.

`paged_attention_triton` and `paged_attention_ref.paged_attention_torch` (the torch path, in a
module that never imports triton) share one signature, so the registry can swap them.
q [T, nq, D] holds the new tokens of S sequences laid end to end (`query_start` [S+1]); their
K/V are already in the flat cache [slots, nkv, D] (slot = block * block_size + offset). Token i
of sequence s sits at position p = context_lens[s] - q_len + i and sees the keys at positions
(p - window, p] (all of [0, p] without a window).

Kernel layout. Program (tile, kv_head, split): `tile` is a run of BLOCK_Q consecutive query
tokens of one sequence (found by a binary search over `query_start`, so no host-side map and no
device sync); the g query heads sharing `kv_head` are packed into the rows of one
[BLOCK_M = BLOCK_Q * G_PAD, D] tile, so every K/V tile is read once per KV head and feeds a
tensor-core dot even for decode. KV positions are walked in BLOCK_N tiles through the block
table (any page size), with an online softmax in fp32; tiles wholly before the window or past
the causal limit are never visited. With `num_splits > 1` (flash-decoding) each split handles
a slice of the KV tiles and writes an unnormalised partial (acc, max, sum); a second kernel
merges them. The host picks the splits so that a small decode batch still fills the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache

import torch
import triton
import triton.language as tl

from zayaserve.kernels.paged_attention_ref import AttentionPlan

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32


def _target_backend() -> str:
    """'cuda', 'hip', or 'interpreter'; never raises on a machine without a GPU driver."""
    if _INTERPRET:
        return "interpreter"
    try:
        return str(triton.runtime.driver.active.get_current_target().backend)
    except Exception:  # no active driver (CPU-only torch): the kernel will not be launched
        return "none"


def _configs(backend: str) -> list[triton.Config]:
    if backend in ("interpreter", "none"):
        # One config: the interpreter is slow and autotuning would only multiply that.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if backend == "hip":
        # MI300X: 64-wide wavefronts, no cp.async pipeline (1-2 stages), occupancy steered
        # with waves_per_eu rather than stages. waves_per_eu 2 caps a wave at 256 VGPRs, which
        # every config fits without spilling (checked on gfx942 assembly); 3 would spill.
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "waves_per_eu": w}, num_warps=nw,
                          num_stages=ns)
            for bm, bn, nw, ns, w in [
                (16, 64, 4, 1, 2), (16, 128, 4, 1, 2), (16, 64, 4, 2, 2), (32, 64, 4, 1, 2),
                (64, 64, 8, 1, 2), (128, 64, 8, 1, 2), (128, 32, 4, 2, 1),
            ]
        ]
    # CUDA (A100/H100): decode-shaped tiles (BLOCK_M 16) lean on deep pipelining of the K/V
    # loads; prefill tiles trade stages for a larger M.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
        for bm, bn, nw, ns in [
            (16, 64, 4, 2), (16, 64, 4, 3), (16, 128, 4, 2), (16, 32, 4, 4), (32, 64, 4, 3),
            (64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 8, 2), (128, 32, 8, 3),
        ]
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    # A tile must hold at least one token's whole head group.
    g_pad = int(named_args.get("G_PAD", kwargs.get("G_PAD", 1)))  # type: ignore[call-overload]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] >= g_pad]
    return kept or configs


BACKEND = _target_backend()


@triton.autotune(
    configs=_configs(BACKEND),
    key=["HEAD_D", "G_PAD", "PAGE", "q_len_bucket", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    qs_ptr, ctx_ptr, bt_ptr,
    num_seqs, num_tokens, num_splits, window, qk_scale, q_len_bucket,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_bt,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
    FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // G_PAD
    tile_id = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # Sequence s owns tiles starting at query_start[s] // BLOCK_Q + s (an upper bound on the
    # tiles before it); the last s whose start is <= tile_id owns this tile.
    lo = tile_id * 0  # an int32 tensor, not a constexpr 0: it is loop-carried
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.load(qs_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        lo = tl.where(start <= tile_id, mid, lo)
        hi = tl.where(start <= tile_id, hi, mid - 1)
    seq = lo
    q_row0 = tl.load(qs_ptr + seq).to(tl.int32)
    q_len = tl.load(qs_ptr + seq + 1).to(tl.int32) - q_row0
    q_first = (tile_id - (q_row0 // BLOCK_Q + seq)) * BLOCK_Q  # first token of the tile
    if q_first >= q_len:
        return
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)

    rows = tl.arange(0, BLOCK_M)
    tok = q_first + rows // G_PAD  # token index within the sequence
    head = kvh * G + rows % G_PAD
    row_ok = (rows % G_PAD < G) & (tok < q_len)
    q_pos = ctx - q_len + tok  # [BLOCK_M]
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_D

    q_off = (q_row0 + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptr + q_off + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)

    # Keys this tile can see: [kv_lo, kv_hi), aligned to BLOCK_N so tiles follow pages.
    kv_hi = ctx - q_len + tl.minimum(q_first + BLOCK_Q, q_len)
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(ctx - q_len + q_first - window + 1, 0)
    kv_lo = (kv_lo // BLOCK_N) * BLOCK_N
    n_tiles = (kv_hi - kv_lo + BLOCK_N - 1) // BLOCK_N
    t0 = 0
    t1 = n_tiles
    if SPLIT:
        per = (n_tiles + num_splits - 1) // num_splits
        t0 = tl.minimum(split * per, n_tiles)
        t1 = tl.minimum(t0 + per, n_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for t in range(t0, t1):
        k_pos = kv_lo + t * BLOCK_N + cols  # [BLOCK_N]
        k_ok = k_pos < kv_hi
        page = tl.load(bt_ptr + seq * stride_bt + k_pos // PAGE, mask=k_ok, other=0)
        slot = page.to(tl.int64) * PAGE + k_pos % PAGE
        kv_mask = k_ok[None, :] & d_ok[:, None]
        k = tl.load(k_ptr + slot[None, :] * stride_ks + kvh * stride_kh + d[:, None],
                    mask=kv_mask, other=0.0)  # [D_PAD, BLOCK_N]
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                    mask=tl.trans(kv_mask), other=0.0)  # [BLOCK_N, D_PAD]
        s = tl.dot(q, k.to(tl.float32), input_precision="ieee") if FP32_DOT else tl.dot(q, k)
        s = s * qk_scale  # log2 domain: exp2 below is the softmax's exp
        allowed = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            allowed &= k_pos[None, :] > q_pos[:, None] - window
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps max -inf; shifting by 0 keeps exp2 NaN-free.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:  # p still rounded to the cache dtype, as the reference does
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    row_t = (q_row0 + tok).to(tl.int64)
    store_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        # Partials are [splits, T, nq, *] fp32; the merge kernel normalises.
        base = (split * num_tokens + row_t) * (tl.num_programs(1) * G) + head
        tl.store(part_acc_ptr + base[:, None] * HEAD_D + d[None, :], acc, mask=store_mask)
        tl.store(part_ml_ptr + base * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_off = row_t[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, num_splits, num_rows, stride_ot, stride_oh,
    NQ: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # token
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [H]
    sp = tl.arange(0, SPLITS_PAD)  # [S]
    d = tl.arange(0, D_PAD)
    ok = (sp < num_splits)[:, None] & (h < NQ)[None, :]  # [S, H]
    base = (sp.to(tl.int64)[:, None] * num_rows + row) * NQ + h[None, :]  # [S, H]
    m = tl.load(part_ml_ptr + base * 2, mask=ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + base * 2 + 1, mask=ok, other=0.0)
    m_max = tl.max(m, 0)  # [H]
    # Splits that saw no visible key carry max -inf and weigh nothing.
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_max[None, :]))  # [S, H]
    d_ok = (d < HEAD_D)[None, None, :]
    acc = tl.load(part_acc_ptr + base[:, :, None] * HEAD_D + d[None, None, :],
                  mask=ok[:, :, None] & d_ok, other=0.0)  # [S, H, D]
    num = tl.sum(acc * w[:, :, None], 0)  # [H, D]
    den = tl.sum(l_s * w, 0)  # [H]
    out = num / tl.where(den > 0, den, 1.0)[:, None]
    o_off = row * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty),
             mask=(h < NQ)[:, None] & (d < HEAD_D)[None, :])


def _as_tensor(x: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.int32,
                                                             device=device)


@cache
def _num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def _default_splits(num_tokens: int, num_seqs: int, nkv: int, device: torch.device) -> int:
    """Enough KV splits that about two programs per SM are busy; 1 under the interpreter."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    # Decode-only batches have exactly one tile per sequence; prefill tiles are plentiful.
    tiles = num_seqs if num_tokens == num_seqs else num_tokens // 16 + num_seqs
    return max(1, min(_MAX_SPLITS, triton.cdiv(2 * sms, max(1, tiles * nkv))))


def paged_attention_triton(
    q: torch.Tensor,  # [T, nq, D]
    k_cache: torch.Tensor,  # [slots, nkv, D]
    v_cache: torch.Tensor,  # [slots, nkv, D]
    query_start: torch.Tensor | Sequence[int],  # [S+1]
    context_lens: torch.Tensor | Sequence[int],  # [S]
    block_tables: torch.Tensor,  # [S, max_blocks], -1 padding
    block_size: int,
    scale: float,
    window: int | None,
    plan: AttentionPlan | None = None,  # torch path only; accepted for a uniform signature
    *,
    num_splits: int | None = None,  # KV splits (flash-decoding); None: chosen for occupancy
) -> torch.Tensor:
    del plan
    T, nq, D = q.shape
    assert k_cache.dim() == 3 and k_cache.shape == v_cache.shape, "caches must be [slots, nkv, D]"
    nkv = k_cache.shape[1]
    assert k_cache.shape[2] == D and nq % nkv == 0, (q.shape, k_cache.shape)
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert q.stride(2) == k_cache.stride(2) == v_cache.stride(2) == 1, "head_dim must be contiguous"
    assert q.device == k_cache.device == v_cache.device == block_tables.device
    qs = _as_tensor(query_start, q.device)
    ctx = _as_tensor(context_lens, q.device)
    S = ctx.shape[0]
    assert qs.shape == (S + 1,) and block_tables.dim() == 2 and block_tables.shape[0] == S
    assert not qs.is_floating_point() and not ctx.is_floating_point()
    assert not block_tables.is_floating_point() and block_tables.stride(1) == 1
    assert window is None or window >= 1, window
    assert block_size >= 1
    g = nq // nkv
    g_pad = triton.next_power_of_2(g)
    assert g_pad <= 16 or not _INTERPRET, "the interpreter config packs at most 16 heads"
    d_pad = max(16, triton.next_power_of_2(D))  # tl.dot needs every dimension >= 16
    out = torch.empty_like(q)
    if T == 0 or S == 0:
        return out
    splits = num_splits or _default_splits(T, S, nkv, q.device)
    assert 1 <= splits <= _MAX_SPLITS, splits
    if splits > 1:
        part_acc = torch.empty(splits, T, nq, D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(splits, T, nq, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # never touched: SPLIT is a constexpr False
    q_len_bucket = min(triton.next_power_of_2(triton.cdiv(T, S)), 256)

    def grid(meta: dict) -> tuple[int, int, int]:
        block_q = meta["BLOCK_M"] // g_pad
        return T // block_q + S, nkv, splits

    _paged_attn_kernel[grid](
        q, k_cache, v_cache, out, part_acc, part_ml, qs, ctx, block_tables,
        S, T, splits, window or 0, scale * _LOG2E, q_len_bucket,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        G=g, G_PAD=g_pad, HEAD_D=D, D_PAD=d_pad, PAGE=block_size,
        HAS_WINDOW=window is not None, SPLIT=splits > 1,
        # fp32 inputs: exact (IEEE) dots, not TF32. The interpreter (triton 3.9) multiplies
        # bf16 operands as their raw uint16 bits, so there every dot runs on fp32 copies.
        FP32_DOT=q.dtype == torch.float32 or _INTERPRET,
    )
    if splits > 1:
        # Few heads per program keep the merge spread over the GPU; the interpreter pays per
        # program, so there one program takes every head of a token.
        block_h = triton.next_power_of_2(nq) if _INTERPRET else 2
        _merge_splits_kernel[(T, triton.cdiv(nq, block_h))](
            out, part_acc, part_ml, splits, T, out.stride(0), out.stride(1),
            NQ=nq, HEAD_D=D, D_PAD=d_pad,
            SPLITS_PAD=triton.next_power_of_2(splits), BLOCK_H=block_h,
        )
    return out

