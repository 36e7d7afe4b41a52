"""Counter-based sampling: a row's draw is a pure function of (seed, position), so it never
depends on which other rows share the batch, on the order steps run in, or on how many draws
came before (async scheduling, preemption and recompute all see the same numbers), and a whole
batch is drawn with one cumulative sum and one search instead of a generator call per row.

Each row takes one uniform number u in [0, 1) from a hash of its key (53 bits from two rounds
of Chris Wellons' "lowbias32" finaliser) and picks the first token whose cumulative probability
exceeds u times the row's total: inverse-CDF sampling, exact for any distribution, and a token
with probability 0 can never be the first to exceed it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


def _mix(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """A seed's 32-bit key (seeds are taken modulo 2**64); computed once per sequence."""
    seed &= (1 << 64) - 1
    return _mix(seed ^ _mix(seed >> 32))


def uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) of a draw at `position` of a sequence seeded `seed`."""
    return float(uniforms([seed_key(seed)], [position])[0])


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x, c < 2**32 in int64 without overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix_t(x: torch.Tensor) -> torch.Tensor:
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(keys: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    """`uniform` of many rows at once from their `seed_key`s, as float64 (same values). On the
    host, on purpose: the engine computes them while the device runs the forward."""
    k = torch.tensor(keys, dtype=torch.int64, device="cpu")
    key = k ^ _mix_t(torch.tensor(positions, dtype=torch.int64, device="cpu") + _GOLDEN)
    hi, lo = _mix_t(key), _mix_t(key ^ _GOLDEN)
    return ((hi << 21) ^ (lo >> 11)).double() * 2.0**-53


def draw(probs: torch.Tensor, u: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """One token per row of unnormalised `probs` [R, V] (cut tokens at 0), by inverse CDF on
    the rows' uniform numbers `u`."""
    cdf = probs.double().cumsum(dim=1)
    u = torch.as_tensor(u, dtype=torch.float64, device=probs.device).unsqueeze(1)
    target = u * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
