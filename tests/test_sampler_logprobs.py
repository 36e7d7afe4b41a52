"""Logprobs from the sampler and prompt_logprobs: values, ranks (true and tied), order, raw
rather than tempered, and chunking that does not change them."""

from __future__ import annotations

import pytest
import torch
from sampler_helpers import gen, row

from zayaserve.replicas.engine import logprobs as logprobs_mod
from zayaserve.replicas.engine.logprobs import prompt_logprobs
from zayaserve.replicas.engine.sampler import SamplingRow, sample


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
