"""Top-k and top-p (nucleus) filtering in the sampler: the support they leave, the candidate
shortcut against a full sort, their order, and ties at the nucleus edge."""

from __future__ import annotations

import pytest
import torch
from sampler_helpers import draw_many, gen, row

from zayaserve.replicas.engine import sampler as sampler_mod
from zayaserve.replicas.engine.sampler import sample


def probs_to_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


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


def test_top_p_keeps_every_token_tied_with_the_last() -> None:
    # 0.4 + 0.2 reaches 0.55 at a 0.2 that two tokens share: both stay, whatever sort order.
    logits = probs_to_logits([0.2, 0.4, 0.1, 0.2, 0.1])
    probs = sampler_mod._filtered_probs(logits.unsqueeze(0), [row(top_p=0.55)])
    assert set(probs[0].nonzero().squeeze(1).tolist()) == {0, 1, 3}
