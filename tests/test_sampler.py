"""The sampler's choice of token: greedy and its ties, banned ids, per-row seeds (reproducible,
independent of the batch), temperature, shapes and validation, and the counter-based draws."""

from __future__ import annotations

import math

import pytest
import torch
from sampler_helpers import draw_many, gen, row

from zayaserve.replicas.engine import sampler as sampler_mod
from zayaserve.replicas.engine.sampler import SampledToken, SamplingRow, sample


def test_greedy_is_argmax() -> None:
    logits = torch.randn(16, 1000, generator=gen(1))
    out = sample(logits, [row(temperature=0.0) for _ in range(16)])
    assert [t.token_id for t in out] == logits.argmax(dim=1).tolist()


def test_greedy_tie_takes_lowest_id() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0]])
    assert sample(logits, [row(temperature=0.0)])[0].token_id == 1


def test_banned_ids_never_chosen() -> None:
    logits = torch.tensor([[0.0, 10.0, 9.0, 1.0, 0.5]])
    before = logits.clone()
    assert sample(logits, [row(temperature=0.0, banned=(1, 2))])[0].token_id == 3
    drawn = set(draw_many(logits[0], 2000, banned=(1, 2)))
    assert drawn.isdisjoint({1, 2}) and drawn <= {0, 3, 4}
    assert torch.equal(logits, before)  # banning works on a copy


def test_out_of_range_bans_ignored_and_all_banned_raises() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    assert sample(logits, [row(temperature=0.0, banned=(2, 99, -1))])[0].token_id == 1
    with pytest.raises(ValueError, match="banned"):
        sample(logits, [row(banned=(0, 1, 2))])


def test_seeded_row_reproducible_across_calls() -> None:
    logits = torch.randn(1, 5000, generator=gen(2))
    a = [sample(logits, [row(seed=42)], positions=[9])[0].token_id for _ in range(3)]
    b = [sample(logits, [row(seed=7)], positions=[p])[0].token_id for p in range(20)]
    b2 = [sample(logits, [row(seed=7)], positions=[p])[0].token_id for p in range(20)]
    other = [sample(logits, [row(seed=8)], positions=[p])[0].token_id for p in range(20)]
    assert len(set(a)) == 1
    assert b == b2 and len(set(b)) > 1  # a stream over positions, not one value repeated
    assert other != b  # another seed, another stream


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 50, 0.9)])
def test_seeded_row_independent_of_batch(temperature: float, top_k: int, top_p: float) -> None:
    vocab = 4000
    logits = torch.randn(6, vocab, generator=gen(3))
    target = logits[2:3]

    def seeded() -> SamplingRow:
        return row(temperature, top_k, top_p, seed=1234, num_logprobs=3)

    alone = sample(target, [seeded()])[0]
    mates = [
        row(seed=99),
        row(temperature=0.0),
        row(seed=5, top_k=10),
        row(seed=99, top_p=0.5),
        row(seed=6),
    ]
    for pos in (0, 2, 5):
        rows = [*mates[:pos], seeded(), *mates[pos:]]
        batch_logits = torch.cat([logits[:pos], target, logits[pos:5]])
        assert sample(batch_logits, rows)[pos] == alone


def test_tiny_temperature_matches_greedy() -> None:
    logits = torch.randn(32, 300, generator=gen(6))
    greedy = [t.token_id for t in sample(logits, [row(temperature=0.0)] * 32)]
    cold = sample(logits, [row(temperature=1e-4, seed=i) for i in range(32)])
    assert [t.token_id for t in cold] == greedy
    below_eps = sample(logits, [row(temperature=1e-7)] * 32)  # treated as greedy, no overflow
    assert [t.token_id for t in below_eps] == greedy


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    n = 20000
    drawn = torch.tensor(draw_many(logits, n, seed=11, temperature=temperature))
    observed = torch.bincount(drawn, minlength=8).double()
    expected = torch.softmax(logits.double() / temperature, dim=0) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # 99.9th percentile of chi-square with 7 degrees of freedom


def test_low_precision_logits_and_shapes() -> None:
    logits = torch.randn(2, 50, generator=gen(12)).to(torch.bfloat16)
    out = sample(logits, [row(temperature=0.0), row(num_logprobs=1)])
    assert out[0].token_id == int(logits[0].float().argmax())
    assert all(isinstance(t, SampledToken) and math.isfinite(t.logprob) for t in out)
    assert sample(torch.empty(0, 50), []) == []
    with pytest.raises(ValueError, match="rows"):
        sample(torch.zeros(2, 5), [row()])
    with pytest.raises(ValueError, match=r"\[S, V\]"):
        sample(torch.zeros(5), [row()])


def test_row_validation() -> None:
    with pytest.raises(ValueError, match="temperature"):
        row(temperature=-0.1)
    with pytest.raises(ValueError, match="top_p"):
        row(top_p=0.0)
    with pytest.raises(ValueError, match="num_logprobs"):
        row(num_logprobs=-1)
    assert not row(temperature=0.5, top_k=0).is_greedy and row(temperature=0.5, top_k=1).is_greedy


def test_counter_based_draws() -> None:
    """A draw is a function of (seed, position) alone, uniform in [0, 1), and never picks a
    token of probability 0."""
    from zayaserve.replicas.engine.noise import draw, uniform

    us = [uniform(s, p) for s in range(200) for p in range(50)]
    assert all(0.0 <= u < 1.0 for u in us) and len(set(us)) == len(us)
    assert abs(sum(us) / len(us) - 0.5) < 0.01
    assert uniform(7, 3) == uniform(7, 3) != uniform(7, 4) != uniform(8, 3)
    assert uniform(2**64 + 5, 1) == uniform(5, 1)  # seeds are taken modulo 2**64
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).expand(4000, -1)
    picked = draw(probs, [uniform(1, p) for p in range(4000)])
    counts = torch.bincount(picked, minlength=5).tolist()
    assert counts[0] == counts[2] == counts[4] == 0 and 900 < counts[1] < 1100


def test_draws_computed_ahead_are_the_ones_sample_uses() -> None:
    logits = torch.randn(6, 300, generator=gen(21))
    rows = [row(temperature=0.0 if i == 2 else 0.9, seed=40 + i, top_p=0.9) for i in range(6)]
    positions = [7, 8, 9, 10, 11, 12]
    draws = sampler_mod.random_draws(rows, positions)
    assert draws.shape == (5,)  # one per non-greedy row
    assert sample(logits, rows, None, positions, draws) == sample(logits, rows, None, positions)
    other = sample(logits, rows, None, positions, 1.0 - draws)
    assert [t.token_id for t in other] != [t.token_id for t in sample(logits, rows, None,
                                                                     positions)]
