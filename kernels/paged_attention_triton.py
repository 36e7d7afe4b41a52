"""GQA attention over a paged KV cache: one Triton kernel for decode and chunked prefill.

`paged_attention_triton` and `paged_attention_ref.paged_attention_torch` (the torch path, in a
module that never imports triton) share one signature, so the registry can swap them.
q [T, nq, D] holds the new tokens of S sequences laid end to end (`query_start` [S+1]); their
K/V are already in the flat cache [slots, nkv, D] (slot = block * block_size + offset). Token i
of sequence s sits at position p = context_lens[s] - q_len + i and sees the keys at positions
(p - window, p] (all of [0, p] without a window).

The kernels and their layout are in `paged_attention_kernels_triton`. With `num_splits > 1`
(flash-decoding) a second kernel merges the splits' partials; the host picks the splits so that
a small decode batch still fills the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
import triton

from zayaserve.kernels.paged_attention_kernels_triton import (
    INTERPRET,
    merge_splits_kernel,
    paged_attn_kernel,
)
from zayaserve.kernels.paged_attention_ref import AttentionPlan

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32


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
    assert g_pad <= 16 or not INTERPRET, "the interpreter config packs at most 16 heads"
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

    paged_attn_kernel[grid](
        q, k_cache, v_cache, out, part_acc, part_ml, qs, ctx, block_tables,
        S, T, splits, window or 0, scale * _LOG2E, q_len_bucket,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        G=g, G_PAD=g_pad, HEAD_D=D, D_PAD=d_pad, PAGE=block_size,
        HAS_WINDOW=window is not None, SPLIT=splits > 1,
        # fp32 inputs: exact (IEEE) dots, not TF32. The interpreter (triton 3.9) multiplies
        # bf16 operands as their raw uint16 bits, so there every dot runs on fp32 copies.
        FP32_DOT=q.dtype == torch.float32 or INTERPRET,
    )
    if splits > 1:
        # Few heads per program keep the merge spread over the GPU; the interpreter pays per
        # program, so there one program takes every head of a token.
        block_h = triton.next_power_of_2(nq) if INTERPRET else 2
        merge_splits_kernel[(T, triton.cdiv(nq, block_h))](
            out, part_acc, part_ml, splits, T, out.stride(0), out.stride(1),
            NQ=nq, HEAD_D=D, D_PAD=d_pad,
            SPLITS_PAD=triton.next_power_of_2(splits), BLOCK_H=block_h,
        )
    return out
