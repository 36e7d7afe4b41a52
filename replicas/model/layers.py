"""Small building blocks shared by the attention side: norms, residual scaling, partial RoPE."""

from __future__ import annotations

import functools

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, scaled in the input dtype (as the reference does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class ResidualScaling(nn.Module):
    """Learned scale/bias on both the block output and the (fp32) residual stream."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(size))
        self.hidden_states_bias = nn.Parameter(torch.zeros(size))
        self.residual_scale = nn.Parameter(torch.ones(size))
        self.residual_bias = nn.Parameter(torch.zeros(size))

    def forward(self, block_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        block_out = (block_out + self.hidden_states_bias) * self.hidden_states_scale
        residual = (residual + self.residual_bias) * self.residual_scale
        return block_out + residual


@functools.cache
def _inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """The inverse frequencies, computed once per device: the pow runs on the CPU (the
    reference's arithmetic, bit for bit), and the result is copied over once, not per step."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim
    return 1.0 / (theta ** exponent).to(device)


def rope_cos_sin(
    positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, rotary_dim] for absolute positions [T]."""
    inv_freq = _inv_freq(rotary_dim, theta, positions.device)
    freqs = positions[:, None].float() * inv_freq  # [T, rotary_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `rotary_dim` channels of every head. x [T, heads, D], cos/sin [T, R]."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    x_rot = x_rot * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat((x_rot, x_pass), dim=-1)
