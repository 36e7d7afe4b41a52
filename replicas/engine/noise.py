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

import numpy as np
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


def _mix_np(x: np.ndarray) -> np.ndarray:
    """`_mix` of many uint64 values at once (uint64 products wrap mod 2**64, so masking them
    to 32 bits gives the products mod 2**32)."""
    x = x & _M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(_M32)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & np.uint64(_M32)
    return x ^ (x >> np.uint64(16))


def uniforms(keys: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    """`uniform` of many rows at once from their `seed_key`s, as float64 (same values). On the
    host, on purpose: the engine computes them while the device runs the forward."""
    golden = np.uint64(_GOLDEN)
    key = np.array(keys, dtype=np.uint64) ^ _mix_np(
        np.array(positions, dtype=np.uint64) + golden)
    bits = (_mix_np(key) << np.uint64(21)) ^ (_mix_np(key ^ golden) >> np.uint64(11))
    return torch.from_numpy(bits.astype(np.float64) * 2.0**-53)


def draw(probs: torch.Tensor, u: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """One token per row of unnormalised `probs` [R, V] (cut tokens at 0), by inverse CDF on
    the rows' uniform numbers `u`."""
    cdf = probs.double().cumsum(dim=1)
    u = torch.as_tensor(u, dtype=torch.float64, device=probs.device).unsqueeze(1)
    target = u * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
