"""vLLM's sampling extras (min_p, repetition/presence/frequency penalties) through the engine,
end to end on the tiny checkpoint: they curb repetition, rows carry each sequence's history,
unpenalised neighbours are unaffected, and seeded penalised sampling replays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from test_penalties import reference_penalised

from zayaserve import LLM, SamplingParams
from zayaserve.replicas.engine import step_sampling as engine_mod
from zayaserve.replicas.engine.sampler import SampledToken, SamplingRow, sample

PROMPTS = [[2, 40, 41, 42], [5, 6, 7, 8, 9], [3, 100, 3, 100, 3]]


def greedy(max_tokens: int = 32, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def ids(outs: Sequence[Any]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(model=str(tiny_checkpoint), num_kv_blocks=256)


def prompts() -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": p} for p in PROMPTS]


def test_engine_penalties_curb_repetition(llm: LLM) -> None:
    plain = ids(llm.generate(prompts(), greedy()))
    # The random tiny model loops on a few tokens when greedy.
    assert all(len(set(t)) < len(t) // 2 for t in plain)
    rep = ids(llm.generate(prompts(), greedy(repetition_penalty=2.0)))
    assert all(len(set(t)) == len(t) for t in rep)  # no token twice
    freq = ids(llm.generate(prompts(), greedy(frequency_penalty=2.0)))
    pres = ids(llm.generate(prompts(), greedy(presence_penalty=2.0)))
    for base, f, p in zip(plain, freq, pres, strict=True):
        assert len(set(f)) > len(set(base)) and len(set(p)) > len(set(base))
    # Only the repetition penalty reads the prompt: the second prompt's greedy first token is
    # its own last token, which frequency and presence leave alone.
    assert plain[1][0] == PROMPTS[1][-1] == freq[1][0] == pres[1][0] != rep[1][0]


def test_engine_rows_carry_the_sequence_history(llm: LLM,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sampled row sees its own prompt and outputs so far, and takes the argmax of the
    reference-penalised logits; rows without penalties carry no ids."""
    seen: list[tuple[torch.Tensor, list[SamplingRow], list[SampledToken]]] = []

    def spy(logits: torch.Tensor, rows: Sequence[SamplingRow],
            mask: Any = None, positions: Any = None, draws: Any = None
            ) -> list[SampledToken]:
        out = sample(logits, rows, mask, positions, draws)
        seen.append((logits.clone(), list(rows), out))
        return out

    monkeypatch.setattr(engine_mod, "sample", spy)
    params = [greedy(12, repetition_penalty=1.4, frequency_penalty=0.5),
              greedy(12), greedy(12, presence_penalty=1.0, min_p=0.5)]
    outs = ids(llm.generate(prompts(), params))
    checked = 0
    for logits, rows, sampled in seen:
        for i, (r, tok) in enumerate(zip(rows, sampled, strict=True)):
            if r.repetition_penalty != 1.0:
                k, prompt = 0, PROMPTS[0]
            elif r.presence_penalty:
                k, prompt = 2, []
            else:
                assert not r.prompt_token_ids and not r.output_token_ids
                continue
            done = len(r.output_token_ids)
            assert list(r.prompt_token_ids) == prompt
            assert list(r.output_token_ids) == outs[k][:done] and tok.token_id == outs[k][done]
            assert tok.token_id == int(reference_penalised(logits[i].float(), r).argmax())
            checked += 1
    assert checked == 24


def test_engine_defaults_unchanged_and_unpenalised_neighbours_unaffected(llm: LLM) -> None:
    plain = llm.generate(prompts(), greedy(16, logprobs=2))
    explicit = llm.generate(prompts(), greedy(16, logprobs=2, min_p=0.0, repetition_penalty=1.0,
                                              presence_penalty=0.0, frequency_penalty=0.0))
    for a, b in zip(plain, explicit, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == b.outputs[0].cumulative_logprob
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
    # A penalised request in the batch changes nothing for the others.
    mixed = llm.generate(prompts(), [greedy(16, logprobs=2, frequency_penalty=2.0),
                                     greedy(16, logprobs=2), greedy(16, logprobs=2)])
    for a, b in zip(plain[1:], mixed[1:], strict=True):
        # (Tokens only: the model's own numerics may move with what else is in the batch.)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert mixed[0].outputs[0].token_ids != plain[0].outputs[0].token_ids


def test_engine_seeded_penalised_sampling_reproducible_across_batches(llm: LLM) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05, seed=5, n=2, max_tokens=16,
                            ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5,
                            presence_penalty=0.3)
    (alone,) = llm.generate(prompts()[:1], params)
    batch = llm.generate(prompts(), [params, greedy(20, frequency_penalty=1.0),
                                     SamplingParams(temperature=1.0, max_tokens=8,
                                                    presence_penalty=1.0)])
    assert [c.token_ids for c in batch[0].outputs] == [c.token_ids for c in alone.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids
