"""What the sampler tests share: seeded generators, sampling rows and many draws of one row."""

from __future__ import annotations

import torch

from zayaserve.replicas.engine.sampler import SamplingRow, sample


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def row(
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_logprobs: int | None = None,
    banned: tuple[int, ...] = (),
) -> SamplingRow:
    return SamplingRow(temperature, top_k, top_p, seed, num_logprobs, banned_token_ids=banned)


def draw_many(logits_row: torch.Tensor, n: int, seed: int = 0, **kw: object) -> list[int]:
    """n samples of one row: n batch rows of one seed at positions 0..n-1 (one call)."""
    rows = [row(seed=seed, **kw)] * n  # type: ignore[arg-type]
    return [t.token_id for t in sample(logits_row.expand(n, -1).contiguous(), rows,
                                       positions=range(n))]
