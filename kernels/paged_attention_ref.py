"""Torch reference for GQA attention over a paged KV cache (decode and chunked prefill).

Decode rows (one new token) are batched together, padded to the longest context; each prefill
chunk attends to its whole cached context with a causal (and optional sliding-window) mask.
Softmax runs in fp32 like the reference model. Everything that depends only on the step's
layout (gather slots, masks) lives in an `AttentionPlan` built once and shared by all layers.
`paged_attention_torch` is the registry's torch kernels: the signature of
`paged_attention_triton`, computed here. This module never imports triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class AttentionPlan:
    decode_rows: torch.Tensor  # [B] packed rows of the single-token sequences
    decode_blocks: torch.Tensor  # [B, NB] their block tables (padding points at block 0)
    decode_lens: torch.Tensor  # [B]
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (row a, row b, slots, q pos)
    _masks: dict[tuple[str, int | None], Any] = field(default_factory=dict)
    block_size: int = 1
    static: bool = False  # built from tensors alone (graph capture): no host reads, no memo

    def decode_view(self, window: int | None, block_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks [B, NB], allowed [B, 1, NB*bs]) for a layer's window: a sliding-window layer
        gathers only the blocks that overlap its window, not the whole context."""
        if self.static:
            return self.decode_blocks, _allowed(
                torch.zeros_like(self.decode_lens), self.decode_lens, window, block_size,
                self.decode_blocks.shape[1])
        key = ("decode", window)
        if key not in self._masks:
            lens, bs = self.decode_lens, block_size
            first = torch.zeros_like(lens) if window is None else (
                (lens - window).clamp_min(0) // bs)  # first block any query may see
            width = int((-(-lens // bs) - first).max())
            idx = (first[:, None] + torch.arange(width, device=lens.device)[None]).clamp_max(
                self.decode_blocks.shape[1] - 1)
            blocks = self.decode_blocks.gather(1, idx)
            self._masks[key] = (blocks, _allowed(first, lens, window, bs, width))
        return self._masks[key]  # type: ignore[no-any-return]

    def prefill_mask(self, i: int, window: int | None) -> torch.Tensor:
        key = (f"prefill{i}", window)
        if key not in self._masks:
            _, _, slots, q_pos = self.prefills[i]
            k_pos = torch.arange(slots.shape[0], device=slots.device)[None, :]
            allowed = k_pos <= q_pos[:, None]
            if window is not None:
                allowed &= k_pos > q_pos[:, None] - window
            self._masks[key] = allowed[None]  # [1, n, ctx]
        return self._masks[key]


def _allowed(first: torch.Tensor, lens: torch.Tensor, window: int | None, block_size: int,
             width: int) -> torch.Tensor:
    """[B, 1, width*bs]: which gathered key positions (from block `first` on) a query sees."""
    pos = first[:, None] * block_size + torch.arange(width * block_size, device=lens.device)[None]
    allowed = pos < lens[:, None]
    if window is not None:
        allowed &= pos > (lens[:, None] - 1 - window)
    return allowed[:, None, :]


def static_decode_plan(block_tables: torch.Tensor, context_lens: torch.Tensor,
                       block_size: int) -> AttentionPlan:
    """A plan for a decode-only step made of tensor ops alone, so a CUDA graph can capture it:
    every row gathers every block of its table (the full width) and masks what it may not see.
    """
    rows = torch.arange(block_tables.shape[0], device=block_tables.device)
    return AttentionPlan(rows, block_tables.clamp_min(0), context_lens.long(), [],
                         block_size=block_size, static=True)


def plan_attention(
    query_start: list[int], context_lens: list[int], block_tables: torch.Tensor, block_size: int
) -> AttentionPlan:
    dev = block_tables.device
    num_seqs = len(context_lens)
    decode = [s for s in range(num_seqs) if query_start[s + 1] - query_start[s] == 1]
    lens = torch.tensor([context_lens[s] for s in decode], dtype=torch.int64, device=dev)
    # Whole blocks are gathered (block_size * nkv * D contiguous values each), not slots.
    num_blocks = -(-int(lens.max()) // block_size) if decode else 0
    blocks = block_tables[decode][:, :num_blocks].clamp_min(0)  # [B, NB]
    prefills = []
    for s in range(num_seqs):
        a, b, ctx = query_start[s], query_start[s + 1], context_lens[s]
        if b - a > 1:
            p = torch.arange(ctx, device=dev)
            ctx_slots = block_tables[s][p // block_size] * block_size + p % block_size
            prefills.append((a, b, ctx_slots, torch.arange(ctx - (b - a), ctx, device=dev)))
    rows = torch.tensor([query_start[s] for s in decode], dtype=torch.int64, device=dev)
    return AttentionPlan(rows, blocks, lens, prefills, block_size=block_size)


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


def _attend_fused(
    q: torch.Tensor,  # [B, nkv, g, Tq, D]
    k: torch.Tensor,  # [B, nkv, Tk, D]
    v: torch.Tensor,  # [B, nkv, Tk, D]
    allowed: torch.Tensor,  # [B, Tq, Tk] bool
    scale: float,
) -> torch.Tensor:
    """The same attention through torch's fused SDPA kernel (no [Tq, Tk] score tensors)."""
    B, nkv, g, Tq, D = q.shape
    out = F.scaled_dot_product_attention(
        q.reshape(B, nkv * g, Tq, D), k, v, attn_mask=allowed[:, None], scale=scale,
        enable_gqa=True)
    return out.view(B, nkv, g, Tq, D)


def paged_attention_ref(
    q: torch.Tensor,  # [T, nq, D] new queries, sequences laid end to end
    k_cache: torch.Tensor,  # [slots, nkv, D] (new K already written)
    v_cache: torch.Tensor,  # [slots, nkv, D]
    plan: AttentionPlan,
    scale: float,
    window: int | None,
    fused: bool = False,
) -> torch.Tensor:
    """`fused=False` is the plain-math reference; True computes the same with SDPA."""
    attend = _attend_fused if fused else _attend
    T, nq, D = q.shape
    nkv = k_cache.shape[1]
    g = nq // nkv
    out = torch.empty_like(q)
    B = plan.decode_rows.shape[0]
    if B:
        bs = plan.block_size
        blocks, allowed = plan.decode_view(window, bs)
        k = k_cache.view(-1, bs, nkv, D)[blocks].view(B, -1, nkv, D)
        v = v_cache.view(-1, bs, nkv, D)[blocks].view(B, -1, nkv, D)
        k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # [B, nkv, W, D]
        qd = q[plan.decode_rows].view(B, nkv, g, 1, D)
        o = attend(qd, k, v, allowed, scale)
        out[plan.decode_rows] = o.reshape(B, nq, D)
    for i, (a, b, slots, _) in enumerate(plan.prefills):
        n = b - a
        k = k_cache[slots].permute(1, 0, 2)[None]  # [1, nkv, ctx, D]
        v = v_cache[slots].permute(1, 0, 2)[None]
        qs = q[a:b].view(n, nkv, g, D).permute(1, 2, 0, 3)[None]  # [1, nkv, g, n, D]
        o = attend(qs, k, v, plan.prefill_mask(i, window), scale)
        out[a:b] = o[0].permute(2, 0, 1, 3).reshape(n, nq, D)
    return out


def paged_attention_torch(
    q: torch.Tensor,  # [T, nq, D]
    k_cache: torch.Tensor,  # [slots, nkv, D]
    v_cache: torch.Tensor,  # [slots, nkv, D]
    query_start: torch.Tensor | Sequence[int],  # [S+1]
    context_lens: torch.Tensor | Sequence[int],  # [S]
    block_tables: torch.Tensor,  # [S, max_blocks]
    block_size: int,
    scale: float,
    window: int | None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """The torch path behind the common signature (the reference's layout, attention through
    torch's fused SDPA); pass `plan` to reuse it across layers."""
    if plan is None:
        plan = plan_attention(_as_list(query_start), _as_list(context_lens), block_tables,
                              block_size)
    return paged_attention_ref(q, k_cache, v_cache, plan, scale, window, fused=True)


def _as_list(x: torch.Tensor | Sequence[int]) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]
