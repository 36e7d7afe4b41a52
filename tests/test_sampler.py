from __future__ import annotations

import math

import pytest
import torch

from zayaserve.replicas.engine import logprobs as logprobs_mod
from zayaserve.replicas.engine import sampler as sampler_mod
from zayaserve.replicas.engine.logprobs import prompt_logprobs
from zayaserve.replicas.engine.sampler import SampledToken, SamplingRow, sample


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


def probs_to_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def draw_many(logits_row: torch.Tensor, n: int, seed: int = 0, **kw: object) -> list[int]:
    """n samples of one row: n batch rows of one seed at positions 0..n-1 (one call)."""
    rows = [row(seed=seed, **kw)] * n  # type: ignore[arg-type]
    return [t.token_id for t in sample(logits_row.expand(n, -1).contiguous(), rows,
                                       positions=range(n))]


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


def test_top_k_one_equals_greedy() -> None:
    logits = torch.randn(8, 500, generator=gen(4))
    greedy = sample(logits, [row(temperature=0.0, banned=(int(logits[0].argmax()),))] * 8)
    top1 = sample(logits, [row(temperature=1.5, top_k=1, banned=(int(logits[0].argmax()),))] * 8)
    assert [t.token_id for t in top1] == [t.token_id for t in greedy]


def test_top_k_restricts_support() -> None:
    logits = torch.randn(200, generator=gen(5))
    allowed = set(logits.topk(7).indices.tolist())
    drawn = draw_many(logits, 3000, top_k=7, temperature=3.0)
    assert set(drawn) == allowed  # all within top-k, and (with 3000 hot draws) all of it


@pytest.mark.parametrize(
    "top_p,nucleus", [(0.45, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3, 4})]
)
def test_top_p_restricts_support_to_nucleus(top_p: float, nucleus: set[int]) -> None:
    logits = probs_to_logits([0.5, 0.3, 0.1, 0.06, 0.04])
    assert set(draw_many(logits, 3000, top_p=top_p)) == nucleus


def reference_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    order = probs.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for t in order:
        kept.add(t)
        mass += float(probs[t])
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize("candidates", [(4,), (4, 16), (1024,), ()])
def test_top_p_candidate_shortcut_matches_full_sort(
    monkeypatch: pytest.MonkeyPatch, candidates: tuple[int, ...]
) -> None:
    # Peaked rows have their nucleus inside the first 4 candidates, flat rows spill past them
    # (to 16, then to the full sort); every path must give the reference nucleus.
    monkeypatch.setattr(sampler_mod, "_NUCLEUS_CANDIDATES", candidates)
    monkeypatch.setattr(sampler_mod, "_FULL_SORT_VOCAB", 0)  # the tiers, on a small vocabulary
    base = torch.randn(6, 64, generator=gen(13))
    logits = base * torch.tensor([[6.0], [6.0], [0.3], [0.3], [1.0], [1.0]])
    top_ps = [0.5, 0.93, 0.5, 0.93, 0.7, 0.99]
    rows = [row(top_p=p) for p in top_ps]
    probs = sampler_mod._filtered_probs(logits, rows)
    sizes = []
    for i, p in enumerate(top_ps):
        want = reference_nucleus(torch.softmax(logits[i].double(), dim=0), p)
        assert set(probs[i].nonzero().squeeze(1).tolist()) == want
        sizes.append(len(want))
    assert min(sizes) <= 4 < max(sizes)  # both paths exercised when candidates == 4


def test_top_p_applies_after_top_k_renormalisation() -> None:
    # After top-k=3 the probs are [4/9, 3/9, 2/9]; mass before token 2 is 7/9 >= 0.75, so it is
    # cut. Applied to the unrenormalised probs it would survive (0.7 < 0.75).
    logits = probs_to_logits([0.4, 0.3, 0.2, 0.1])
    assert set(draw_many(logits, 2000, top_k=3, top_p=0.75)) == {0, 1}


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


def test_logprobs_dict_values_ranks_and_order() -> None:
    logits = torch.randn(3, 1000, generator=gen(8))
    rows = [row(temperature=0.8, num_logprobs=5), row(num_logprobs=0), row(num_logprobs=None)]
    out = sample(logits, rows)
    ref = torch.log_softmax(logits, dim=1)
    for i, tok in enumerate(out):
        assert tok.logprob == pytest.approx(float(ref[i, tok.token_id]), abs=1e-5)
        assert tok.logprobs is None or tok.logprobs[tok.token_id].logprob == tok.logprob
    first, zero, none = out
    assert first.logprobs is not None
    keys = list(first.logprobs)
    assert keys[0] == first.token_id
    top5 = ref[0].topk(5).indices.tolist()
    assert set(keys) == {first.token_id, *top5}
    for tid, lp in first.logprobs.items():
        assert lp.logprob == pytest.approx(float(ref[0, tid]), abs=1e-5)
        assert lp.rank == int((ref[0] > ref[0, tid]).sum()) + 1
        assert lp.decoded_token is None
    # top-k entries follow the sampled one in descending order
    assert keys[1:] == [t for t in top5 if t != first.token_id][: len(keys) - 1]
    assert zero.logprobs is not None and list(zero.logprobs) == [zero.token_id]
    assert none.logprobs is None


def test_sampled_token_outside_top_k_has_true_rank() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    out = sample(logits, [row(temperature=0.0, num_logprobs=2, banned=(0, 1, 2))])[0]
    assert out.token_id == 3
    assert out.logprobs is not None
    assert list(out.logprobs) == [3, 0, 1]
    assert [lp.rank for lp in out.logprobs.values()] == [4, 1, 2]
    ref = torch.log_softmax(logits[0], dim=0)
    assert out.logprob == pytest.approx(float(ref[3]), abs=1e-6)


def test_logprobs_are_raw_not_tempered() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    out = sample(logits, [row(temperature=0.3, top_k=2, num_logprobs=3)])[0]
    ref = torch.log_softmax(logits[0], dim=0)
    assert out.logprobs is not None
    assert {k: v.logprob for k, v in out.logprobs.items()} == pytest.approx(
        {i: float(ref[i]) for i in range(3)}, abs=1e-6
    )


def test_tied_logprobs_share_rank() -> None:
    logits = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    out = sample(logits, [row(temperature=0.0, num_logprobs=4)])[0]
    assert out.logprobs is not None
    assert {k: v.rank for k, v in out.logprobs.items()} == {0: 1, 1: 1, 3: 1, 2: 4}


def test_prompt_logprobs() -> None:
    logits = torch.randn(5, 300, generator=gen(9))
    actual = torch.tensor([3, 250, 7, 7, 0])
    ref = torch.log_softmax(logits, dim=1)
    res = prompt_logprobs(logits, actual, 3)
    assert len(res) == 5
    for pos, d in enumerate(res):
        tok = int(actual[pos])
        assert next(iter(d)) == tok
        assert set(d) == {tok, *ref[pos].topk(3).indices.tolist()}
        for tid, lp in d.items():
            assert lp.logprob == pytest.approx(float(ref[pos, tid]), abs=1e-5)
            assert lp.rank == int((ref[pos] > ref[pos, tid]).sum()) + 1
    only = prompt_logprobs(logits, actual, 0)
    assert [list(d) for d in only] == [[t] for t in actual.tolist()]
    assert prompt_logprobs(logits[:0], actual[:0], 2) == []
    with pytest.raises(ValueError, match="next_token_ids"):
        prompt_logprobs(logits, actual[:4], 1)
    with pytest.raises(ValueError, match="k must be"):
        prompt_logprobs(logits, actual, -1)


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn(10, 64, generator=gen(10))

    def rows() -> list[SamplingRow]:
        return [
            row(temperature=0.9, top_k=(i % 3) * 5, top_p=0.8 if i % 2 else 1.0,
                seed=i, num_logprobs=i % 4, banned=(i,))
            for i in range(10)
        ]  # fmt: skip

    whole = sample(logits, rows())
    whole_prompt = prompt_logprobs(logits, torch.arange(10), 4)
    monkeypatch.setattr(logprobs_mod, "_CHUNK_ELEMENTS", 64 * 3)  # 3 rows per chunk
    assert sample(logits, rows()) == whole
    assert prompt_logprobs(logits, torch.arange(10), 4) == whole_prompt


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


def test_top_p_keeps_every_token_tied_with_the_last() -> None:
    # 0.4 + 0.2 reaches 0.55 at a 0.2 that two tokens share: both stay, whatever sort order.
    logits = probs_to_logits([0.2, 0.4, 0.1, 0.2, 0.1])
    probs = sampler_mod._filtered_probs(logits.unsqueeze(0), [row(top_p=0.55)])
    assert set(probs[0].nonzero().squeeze(1).tolist()) == {0, 1, 3}


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
