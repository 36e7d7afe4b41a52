"""The Triton kernels of paged attention; `paged_attention_triton` launches them.

Kernel layout. Program (tile, kv_head, split): `tile` is a run of BLOCK_Q consecutive query
tokens of one sequence (found by a binary search over `query_start`, so no host-side map and no
device sync); the g query heads sharing `kv_head` are packed into the rows of one
[BLOCK_M = BLOCK_Q * G_PAD, D] tile, so every K/V tile is read once per KV head and feeds a
tensor-core dot even for decode. KV positions are walked in BLOCK_N tiles through the block
table (any page size), with an online softmax in fp32; tiles wholly before the window or past
the causal limit are never visited. With `num_splits > 1` (flash-decoding) each split handles
a slice of the KV tiles and writes an unnormalised partial (acc, max, sum); a second kernel
merges them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from zayaserve.kernels.target_triton import triton_target

TARGET = triton_target()
INTERPRET = TARGET == "interpreter"


def _configs(target: str) -> list[triton.Config]:
    if target in ("interpreter", "none"):
        # One config: the interpreter is slow and autotuning would only multiply that.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if target == "hip":
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



@triton.autotune(
    configs=_configs(TARGET),
    key=["HEAD_D", "G_PAD", "PAGE", "q_len_bucket", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def paged_attn_kernel(
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
def merge_splits_kernel(
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
