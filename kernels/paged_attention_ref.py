"""Torch reference for GQA attention over a paged KV cache (decode and chunked prefill).

Decode rows (one new token) are batched together, padded to the longest context; each prefill
chunk attends to its whole cached context with a causal (and optional sliding-window) mask.
Softmax runs in fp32 like the reference model.
"""

from __future__ import annotations

import torch


def _gather_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of positions 0..length-1 of one sequence. block_table [max_blocks]."""
    pos = torch.arange(length, device=block_table.device)
    return block_table[pos // block_size] * block_size + pos % block_size


def _attend(
    q: torch.Tensor,  # [B, nkv, g, Tq, D]
    k: torch.Tensor,  # [B, nkv, Tk, D]
    v: torch.Tensor,  # [B, nkv, Tk, D]
    allowed: torch.Tensor,  # [B, Tq, Tk] bool
    scale: float,
) -> torch.Tensor:
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q, k) * scale
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bhgqk,bhkd->bhgqd", probs, v)


def paged_attention_ref(
    q: torch.Tensor,  # [T, nq, D] new queries, sequences laid end to end
    k_cache: torch.Tensor,  # [slots, nkv, D] (new K already written)
    v_cache: torch.Tensor,  # [slots, nkv, D]
    query_start: list[int],  # [S+1]
    context_lens: list[int],  # [S]
    block_tables: torch.Tensor,  # [S, max_blocks]
    block_size: int,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    T, nq, D = q.shape
    nkv = k_cache.shape[1]
    g = nq // nkv
    out = torch.empty_like(q)
    num_seqs = len(context_lens)
    decode = [s for s in range(num_seqs) if query_start[s + 1] - query_start[s] == 1]
    prefill = [s for s in range(num_seqs) if query_start[s + 1] - query_start[s] > 1]

    if decode:
        lens = torch.tensor([context_lens[s] for s in decode], device=q.device)
        width = int(lens.max())
        pos = torch.arange(width, device=q.device)
        tables = block_tables[decode]  # [B, max_blocks]
        blk = tables.gather(1, (pos // block_size).clamp_max(tables.shape[1] - 1)[None].expand(
            len(decode), -1))
        slots = (blk * block_size + pos % block_size).clamp_min(0)  # [B, width]
        k = k_cache[slots].permute(0, 2, 1, 3)  # [B, nkv, width, D]
        v = v_cache[slots].permute(0, 2, 1, 3)
        allowed = pos[None] < lens[:, None]
        if window is not None:
            allowed &= pos[None] > (lens[:, None] - 1 - window)
        rows = torch.tensor([query_start[s] for s in decode], device=q.device)
        qd = q[rows].view(len(decode), nkv, g, 1, D)
        out[rows] = _attend(qd, k, v, allowed[:, None, :], scale).reshape(len(decode), nq, D)

    for s in prefill:
        a, b, ctx = query_start[s], query_start[s + 1], context_lens[s]
        n = b - a
        slots = _gather_slots(block_tables[s], ctx, block_size)
        k = k_cache[slots].permute(1, 0, 2)[None]  # [1, nkv, ctx, D]
        v = v_cache[slots].permute(1, 0, 2)[None]
        q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        qs = q[a:b].view(n, nkv, g, D).permute(1, 2, 0, 3)[None]  # [1, nkv, g, n, D]
        o = _attend(qs, k, v, allowed[None], scale)  # [1, nkv, g, n, D]
        out[a:b] = o[0].permute(2, 0, 1, 3).reshape(n, nq, D)
    return out
