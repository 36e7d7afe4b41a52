"""vLLM's sampling extras: min_p, repetition/presence/frequency penalties. The batched sampler
against direct per-row reference computations (mixed batches, greedy and random rows, seeds,
chunking); the engine end to end: test_penalties_engine.py."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from zayaserve.replicas.engine import penalties as penalties_mod
from zayaserve.replicas.engine import sampler as sampler_mod
from zayaserve.replicas.engine.penalties import apply_penalties
from zayaserve.replicas.engine.sampler import SamplingRow, sample


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def row(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
        seed: int = 0, num_logprobs: int | None = None,
        banned: tuple[int, ...] = (), **extras: Any) -> SamplingRow:
    return SamplingRow(temperature, top_k, top_p, seed, num_logprobs,
                       banned_token_ids=banned, **extras)


def reference_penalised(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    """vLLM/HF semantics for one row, token by token, in float64."""
    out = logits.double().clone()
    vocab = out.shape[0]
    if r.repetition_penalty != 1.0:
        for t in {*r.prompt_token_ids, *r.output_token_ids}:
            if 0 <= t < vocab:
                v = float(out[t])
                out[t] = v / r.repetition_penalty if v > 0 else v * r.repetition_penalty
    for t, count in Counter(r.output_token_ids).items():
        if 0 <= t < vocab:
            out[t] -= r.frequency_penalty * count + r.presence_penalty
    return out


def reference_min_p_support(logits: torch.Tensor, temperature: float, min_p: float) -> set[int]:
    probs = torch.softmax(logits.double() / temperature, dim=0)
    return set((probs >= min_p * probs.max()).nonzero().squeeze(1).tolist())


def mixed_rows(vocab: int) -> list[SamplingRow]:
    """Rows with and without each penalty, greedy and not, with repeats and odd ids."""
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(0, vocab, (8, 40), generator=g).tolist()
    return [
        row(temperature=0.0),
        row(temperature=0.0, repetition_penalty=1.7, prompt_token_ids=ids[0][:20],
            output_token_ids=ids[0][20:]),
        row(seed=1, presence_penalty=1.5, output_token_ids=ids[1] + ids[1][:5]),
        row(seed=2, num_logprobs=3),
        row(temperature=0.0, frequency_penalty=-0.7, prompt_token_ids=ids[2],
            output_token_ids=ids[3] * 2),
        row(seed=3, repetition_penalty=0.6, presence_penalty=-2.0,
            frequency_penalty=2.0, prompt_token_ids=[*ids[4], vocab, vocab + 9, -1],
            output_token_ids=[*ids[5], vocab + 3]),
        row(temperature=0.0, repetition_penalty=1.3),  # nothing generated yet, empty prompt
        row(seed=4, frequency_penalty=1.0, output_token_ids=[], num_logprobs=2),
    ]


def test_penalties_match_reference_in_a_mixed_batch() -> None:
    vocab = 300
    logits = torch.randn(8, vocab, generator=gen(5)) * 3
    rows = mixed_rows(vocab)
    before = logits.clone()
    got = apply_penalties(logits, rows)
    assert torch.equal(logits, before)  # a copy, not the caller's tensor
    for i, r in enumerate(rows):
        want = reference_penalised(logits[i], r)
        torch.testing.assert_close(got[i].double(), want, rtol=0, atol=1e-5)
        if not penalties_mod.has_penalties(r):
            assert torch.equal(got[i], logits[i])  # untouched rows are bit-identical
    # Repetition counted the prompt; frequency and presence did not.
    assert got[1, rows[1].prompt_token_ids[0]] != logits[1, rows[1].prompt_token_ids[0]]
    only_prompt = set(rows[4].prompt_token_ids) - set(rows[4].output_token_ids)
    assert only_prompt and all(got[4, t] == logits[4, t] for t in only_prompt)


def test_no_penalties_means_no_work() -> None:
    logits = torch.randn(4, 50, generator=gen(6))
    rows = [row(), row(temperature=0.0, min_p=0.3, output_token_ids=[1, 1, 2])]
    assert apply_penalties(logits, rows) is logits
    assert apply_penalties(logits, [row(repetition_penalty=1.0, presence_penalty=0.0)]) is logits


def test_penalties_edge_cases() -> None:
    vocab = 40
    logits = torch.randn(3, vocab, generator=gen(7)) * 2
    # Only out-of-range ids: nothing changes (and nothing is written out of bounds).
    odd = row(repetition_penalty=3.0, frequency_penalty=1.0, prompt_token_ids=[-5, vocab],
              output_token_ids=[vocab + 1])
    assert torch.equal(apply_penalties(logits, [row(), odd, row()]), logits)
    # Nothing seen yet: the logits themselves come back, no copy.
    fresh = row(frequency_penalty=1.0, presence_penalty=1.0, repetition_penalty=1.2)
    assert apply_penalties(logits, [fresh, row(), fresh]) is logits
    # In place, on a transposed (non-contiguous) batch, and with a row's ids mixed with
    # invalid ones: same values as the reference, the caller's tensor untouched unless asked.
    t = logits.t().contiguous().t()
    assert not t.is_contiguous()
    rows = [row(repetition_penalty=2.0, prompt_token_ids=[3, 3, vocab, 0],
                output_token_ids=[-1, 3, 7, 7]), row(), odd]
    got = apply_penalties(t, rows)
    assert torch.equal(t, logits)
    for i, r in enumerate(rows):
        torch.testing.assert_close(got[i].double(), reference_penalised(logits[i], r),
                                   rtol=0, atol=1e-6)
    mine = logits.clone()
    assert apply_penalties(mine, rows, inplace=True) is mine and torch.equal(mine, got)


def test_extreme_repetition_penalties_stay_samplable() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0, 3.0, 2.0]])
    seen = dict(prompt_token_ids=[0, 1, 2], output_token_ids=[])
    tiny = [row(temperature=t, seed=i, repetition_penalty=1e-300, **seen)
            for i, t in enumerate([0.0, 1e-5, 0.5, 1.0])]  # type: ignore[arg-type]
    out = sample(logits.expand(4, -1).contiguous(), tiny)
    assert [t.token_id for t in out] == [0, 0, 0, 0]  # 1.0 / tiny: huge, but finite
    huge = [row(temperature=t, seed=i, repetition_penalty=1e300, **seen)
            for i, t in enumerate([0.0, 0.7])]  # type: ignore[arg-type]
    pen = apply_penalties(logits, huge[:1])
    assert pen[0, 1] == 0.0 and pen[0, 2] < -1e38 and 0 < pen[0, 0] < 1e-30
    for _ in range(20):
        assert {t.token_id for t in sample(logits.expand(2, -1).contiguous(), huge)} <= {
            0, 1, 3, 4}


def test_greedy_rows_take_argmax_after_penalties_and_logprobs_stay_raw() -> None:
    vocab = 300
    logits = torch.randn(8, vocab, generator=gen(8)) * 3
    rows = mixed_rows(vocab)
    logits[1, rows[1].prompt_token_ids[0]] = 12.0  # the top logit, until penalised (to 7.1)
    out = sample(logits, rows)
    raw = torch.log_softmax(logits, dim=1)
    for i, (r, tok) in enumerate(zip(rows, out, strict=True)):
        if r.is_greedy:
            assert tok.token_id == int(reference_penalised(logits[i], r).argmax())
        assert tok.logprob == pytest.approx(float(raw[i, tok.token_id]), abs=1e-5)
        if tok.logprobs is not None:
            for tid, lp in tok.logprobs.items():
                assert lp.logprob == pytest.approx(float(raw[i, tid]), abs=1e-5)
    # The penalty changed a greedy choice (else this test would prove little).
    assert out[1].token_id != int(logits[1].argmax())


def test_repetition_penalty_avoids_seen_greedy_token_and_works_with_bans() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.5, -1.0, -3.0]])
    r = row(temperature=0.0, repetition_penalty=2.0, prompt_token_ids=[0],
            output_token_ids=[3, 3])
    # 4 / 2 = 2 < 3; -1 * 2 = -2; with 1 and 2 banned, the penalised 2 still wins, and with
    # 0 banned too, the unpenalised -3 loses to the penalised -2.
    assert sample(logits, [r])[0].token_id == 1
    banned = row(temperature=0.0, repetition_penalty=2.0, prompt_token_ids=[0],
                 output_token_ids=[3, 3], banned=(1, 2))
    assert sample(logits, [banned])[0].token_id == 0
    assert sample(logits, [row(temperature=0.0, repetition_penalty=2.0, prompt_token_ids=[0],
                               output_token_ids=[3], banned=(0, 1, 2))])[0].token_id == 3


def test_penalties_apply_before_temperature() -> None:
    # Frequency is subtracted from the raw logits and temperature divides the result (vLLM);
    # the other order would divide the penalty too and give a different distribution.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, 1.5])
    outputs = [0, 0, 5, 2]
    extras = dict(frequency_penalty=0.6, presence_penalty=0.2, repetition_penalty=1.3,
                  prompt_token_ids=[4, 1], output_token_ids=outputs)
    n, temperature = 20000, 2.0
    rows = [row(temperature, seed=11, **extras)] * n  # type: ignore[arg-type]
    drawn = torch.tensor([t.token_id for t in sample(logits.expand(n, -1).contiguous(), rows,
                                                     positions=range(n))])
    observed = torch.bincount(drawn, minlength=6).double()
    ref = reference_penalised(logits, rows[0])
    expected = torch.softmax(ref / temperature, dim=0) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 99.9th percentile of chi-square with 5 degrees of freedom


@pytest.mark.parametrize("temperature,min_p", [(1.0, 0.1), (0.5, 0.1), (2.0, 0.3), (1.0, 1.0)])
def test_min_p_support_matches_reference(temperature: float, min_p: float) -> None:
    logits = torch.randn(6, 400, generator=gen(12)) * 2
    rows = [row(temperature, min_p=min_p if i % 2 else 0.0) for i in range(6)]
    probs = sampler_mod._filtered_probs(logits, rows)
    for i in range(6):
        support = set(probs[i].nonzero().squeeze(1).tolist())
        if i % 2:
            assert support == reference_min_p_support(logits[i], temperature, min_p)
        else:
            assert len(support) == 400  # the rows without min_p keep everything


def test_min_p_is_after_temperature_and_before_top_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    # At T=1 the threshold is 0.25 (keeps 0, 1); at T=0.5 the probs sharpen to about
    # [0.66, 0.24, 0.11] and the threshold 0.33 keeps token 0 alone.
    p = sampler_mod._filtered_probs(logits.expand(2, -1), [row(1.0, min_p=0.5),
                                                           row(0.5, min_p=0.5)])
    assert p[0].nonzero().squeeze(1).tolist() == [0, 1]
    assert p[1].nonzero().squeeze(1).tolist() == [0]
    # min_p=0.4 keeps [0.4, 0.3, 0.2] -> renormalised [4/9, 3/9, 2/9], so top_p=0.75 cuts
    # token 2 (7/9 before it). top-p first would keep it (0.7 < 0.75).
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    p = sampler_mod._filtered_probs(logits.unsqueeze(0), [row(min_p=0.4, top_p=0.75)])
    assert p[0].nonzero().squeeze(1).tolist() == [0, 1]
    # With top-k as well: both are cuts, the intersection survives.
    p = sampler_mod._filtered_probs(logits.unsqueeze(0), [row(min_p=0.4, top_k=2)])
    assert p[0].nonzero().squeeze(1).tolist() == [0, 1]


def test_min_p_leaves_greedy_alone() -> None:
    logits = torch.randn(8, 100, generator=gen(13))
    out = sample(logits, [row(temperature=0.0, min_p=1.0)] * 8)
    assert [t.token_id for t in out] == logits.argmax(dim=1).tolist()
    # min_p=1 keeps only the top token, so even hot sampling is the argmax.
    hot = sample(logits, [row(temperature=5.0, min_p=1.0, seed=i) for i in range(8)])
    assert [t.token_id for t in hot] == logits.argmax(dim=1).tolist()


def test_seeded_row_with_extras_independent_of_batch() -> None:
    vocab = 500
    logits = torch.randn(5, vocab, generator=gen(14))
    target = logits[1:2]
    history = dict(prompt_token_ids=list(range(0, 60, 3)), output_token_ids=[7, 7, 9, 300])

    def seeded() -> SamplingRow:
        return row(0.9, top_p=0.95, seed=77, num_logprobs=2, min_p=0.05,
                   repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.4,
                   **history)  # type: ignore[arg-type]

    alone = [sample(target, [seeded()])[0] for _ in range(2)]
    assert alone[0] == alone[1]
    mates = [row(seed=99, repetition_penalty=1.5, output_token_ids=[1, 2]),
             row(temperature=0.0, frequency_penalty=1.0, output_token_ids=[3]),
             row(seed=99, min_p=0.2), row(seed=5)]
    for pos in (0, 2, 4):
        rows = [*mates[:pos], seeded(), *mates[pos:]]
        batch = torch.cat([logits[:pos], target, logits[pos + 1:]])
        assert sample(batch, rows)[pos] == alone[0]


def test_row_validation() -> None:
    with pytest.raises(ValueError, match="min_p"):
        row(min_p=-0.1)
    with pytest.raises(ValueError, match="min_p"):
        row(min_p=1.5)
    with pytest.raises(ValueError, match="repetition_penalty"):
        row(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        row(repetition_penalty=float("nan"))
