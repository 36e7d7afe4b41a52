"""Top-1 MoE expert FFN (SiLU-GLU) with a skip class: the torch reference. This module never
imports triton; `fused_moe_triton` is the Triton kernel with the same contract.

Contract (both backends): `hidden` [T, H]; `expert_rows` [T] int64, the local row of each token's
expert in the stacked weights, or -1 for "no expert here" (the skip class, or an expert another
shard holds): those rows get exact zeros and are never computed. `weights` [T] MoE-gate
probability; `gate_up` [E, 2I, H] (gate is the first half); `down` [E, H, I]. Returns [T, H] in
hidden's dtype: `weight * down(silu(gate) * up)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_ref(
    hidden: torch.Tensor,  # [T, H]
    expert_rows: torch.Tensor,  # [T] int64, -1 = no expert here
    weights: torch.Tensor,  # [T]
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:
    """Group tokens by expert with one sort, run each expert once on its rows, scatter back.

    Same math as `replicas.model.experts.run_grouped` (which this folder may not import)."""
    _check_rows(expert_rows, hidden.shape[0])
    out = torch.zeros_like(hidden)
    order = torch.argsort(expert_rows, stable=True)
    present, counts = torch.unique_consecutive(expert_rows[order], return_counts=True)
    start = 0
    for row, count in zip(present.tolist(), counts.tolist(), strict=True):
        tokens = order[start:start + count]
        start += count
        if row < 0:
            continue
        if row >= gate_up.shape[0]:
            raise ValueError(f"expert row {row} out of range for {gate_up.shape[0]} local experts")
        gate, up = F.linear(hidden[tokens], gate_up[row]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[row])
        out[tokens] = (y * weights[tokens, None]).to(out.dtype)
    return out


def _check_rows(expert_rows: torch.Tensor, num_tokens: int) -> None:
    assert expert_rows.shape == (num_tokens,), f"expert_rows {tuple(expert_rows.shape)}"
    assert expert_rows.dtype == torch.int64, f"expert_rows must be int64, got {expert_rows.dtype}"
