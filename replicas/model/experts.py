"""The expert side: stacked SiLU-GLU experts and the expert backend, the interface the attention
side calls.

The seam between attention and experts is one call, `experts(layer, hidden, expert_ids,
weights)`. In one process it is `LocalExpertBackend`; in the cluster the attention worker
injects `zayaserve.router.remote_experts.RemoteExpertBackend`, which makes the same call over
gRPC through the token router. The model and engine know only this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from zayaserve.kernels.registry import get_op


class ExpertBackend(ABC):
    """Computes the expert outputs of one layer for a batch of routed tokens.

    Contract: `hidden` [T, H] in the model dtype, `expert_ids` [T] int64 in [0, num_experts]
    where `num_experts` is the skip class, `weights` [T] the MoE gate's probability. Returns [T, H]:
    `weight * expert(hidden)` per token, and exact zeros for skip tokens, which are never
    computed or sent anywhere.
    """

    num_experts: int

    @abstractmethod
    def __call__(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor: ...


class ExpertWeights:
    """The experts of one layer that this process holds, stacked: local row i is expert
    `expert_ids[i]` of the checkpoint."""

    def __init__(self, expert_ids: Sequence[int], gate_up: torch.Tensor, down: torch.Tensor):
        assert gate_up.shape[0] == down.shape[0] == len(expert_ids)
        self.expert_ids = list(expert_ids)
        self.gate_up = gate_up  # [E_local, 2I, H]
        self.down = down  # [E_local, H, I]
        self.row_of = {e: i for i, e in enumerate(self.expert_ids)}
        # global expert id -> local row; one past the largest held id (and beyond) -> -1
        table = torch.full((max(self.expert_ids, default=-1) + 2,), -1, dtype=torch.int64)
        table[self.expert_ids] = torch.arange(len(self.expert_ids))
        self._row_table = table
        self._device_tables: dict[torch.device, torch.Tensor] = {}

    def local_rows(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """[T] local rows, -1 for the skip class and for experts held elsewhere. The table is
        copied to each device once, so a decode step makes no host copy (graphs can hold it)."""
        table = self._device_tables.get(expert_ids.device)
        if table is None:
            table = self._device_tables[expert_ids.device] = self._row_table.to(expert_ids.device)
        return table[expert_ids.clamp(max=table.numel() - 1)]

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def run_grouped(
    weights_of_layer: ExpertWeights,
    hidden: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T] global ids; the skip class and unheld experts are ignored
    weights: torch.Tensor,  # [T]
) -> torch.Tensor:
    """Runs each held expert once on its tokens (the `fused_moe` op: grouped by expert)."""
    rows = weights_of_layer.local_rows(expert_ids)
    return get_op("fused_moe")(hidden, rows, weights, weights_of_layer.gate_up,
                               weights_of_layer.down)


class LocalExpertBackend(ExpertBackend):
    """Experts held in this process (the offline engine, tests, the embedded default)."""

    def __init__(self, layers: list[ExpertWeights], num_experts: int) -> None:
        self.layers = layers
        self.num_experts = num_experts
        missing = [
            (i, e) for i, lw in enumerate(layers) for e in range(num_experts) if e not in lw.row_of]
        if missing:
            raise ValueError(f"local expert backend lacks (layer, expert) pairs: {missing[:4]}...")

    def __call__(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return run_grouped(self.layers[layer], hidden, expert_ids, weights)
