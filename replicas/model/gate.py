"""The MoE gate (ZAYA1 calls it the router): an MLP over a down-projected state that also mixes
in the previous layer's router state ("EDA"), choosing one of `num_experts` experts or the extra
skip class.

Only the Python names say "gate"; parameter names (`router_mlp.*`, `router_states_scale`) follow
the transformers checkpoint, which loads name for name.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zayaserve.replicas.model.config import ZayaConfig
from zayaserve.replicas.model.layers import RMSNorm


class GateMLP(nn.Module):
    def __init__(self, size: int, classes: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(size, eps)
        self.fc1 = nn.Linear(size, size, bias=True)
        self.fc2 = nn.Linear(size, size, bias=True)
        self.out_proj = nn.Linear(size, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(self.norm(x)))
        x = F.gelu(self.fc2(x))
        return self.out_proj(x)


class Routing(NamedTuple):
    expert_ids: torch.Tensor  # [T] int64; == num_experts means "skip"
    weights: torch.Tensor  # [T] gate probability of the choice (0 for skip)
    state: torch.Tensor  # [T, R] router state handed to the next layer


class Gate(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        r, classes = config.router_hidden_size, config.num_experts + 1
        self.num_experts = config.num_experts
        self.down_proj = nn.Linear(config.hidden_size, r, bias=True)
        self.use_eda = layer_idx != 0
        self.router_states_scale: nn.Parameter | None = (
            nn.Parameter(torch.ones(r)) if self.use_eda else None)
        self.router_mlp = GateMLP(r, classes, config.rms_norm_eps)
        self.balancing_biases: torch.Tensor
        self.register_buffer("balancing_biases", torch.zeros(classes, dtype=torch.float32))

    def forward(self, x: torch.Tensor, prev_state: torch.Tensor | None) -> Routing:
        state = self.down_proj(x)  # [T, R]
        if self.router_states_scale is not None and prev_state is not None:
            state = state + prev_state * self.router_states_scale
        probs = torch.softmax(self.router_mlp(state), dim=-1)  # [T, E+1]
        # The balancing biases steer the choice only; the weight is the unbiased probability.
        choice = torch.argmax(probs.float() + self.balancing_biases, dim=-1)
        weights = probs.gather(1, choice[:, None])[:, 0]
        weights = weights.masked_fill(choice == self.num_experts, 0)
        return Routing(choice, weights, state)
