"""Resuming a request from what its client already has (request migration's engine half): cut
an uninterrupted stream after any delta, start the request again with a `Resume` of what was
sent, and the two halves make the uninterrupted stream's tokens, text and ending, for greedy,
seeded sampling with penalties, stop strings (text held back at the cut) and JSON grammars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zayaserve import LLM, SamplingParams
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import ParamError
from zayaserve.replicas.engine.resume import Resume

PROMPT = [2, *range(40, 56)]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "n": {"type": "integer"}},
          "required": ["name", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(model=str(tiny_checkpoint), output_thread=False, num_kv_blocks=64)


def _deltas(llm: LLM, rid: str, params: SamplingParams,
            resume: Resume | None = None) -> list[StepDelta]:
    engine = llm.engine
    engine.add_request(rid, list(PROMPT), params, resume=resume)
    out = []
    while engine.has_unfinished_requests():
        out.extend(d for d in engine.step() if d.request_id == rid)
    assert out and out[-1].finished
    return out


def _flat(deltas: list[StepDelta]) -> tuple[list[int], str, tuple[Any, Any]]:
    steps = [c for d in deltas for c in d.completions]
    return ([t for c in steps for t in c.token_ids], "".join(c.text for c in steps),
            (steps[-1].finish_reason, steps[-1].stop_reason))


def _cases(llm: LLM) -> dict[str, SamplingParams]:
    free = _flat(_deltas(llm, "free", SamplingParams(temperature=0, max_tokens=48,
                                                     ignore_eos=True)))[1]
    assert len(free) > 30
    return {
        "greedy": SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
        "seeded with penalties": SamplingParams(
            temperature=1.0, top_p=0.9, seed=11, max_tokens=48, min_tokens=20, logprobs=2,
            repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3),
        # A stop string from the middle of the free text: its first characters are held back
        # from the client until the stop string is known to miss or hit.
        "stop string": SamplingParams(temperature=0, max_tokens=48, ignore_eos=True,
                                      stop=[free[20:26]]),
        "json": SamplingParams(temperature=0.8, seed=5, max_tokens=120, structured_outputs={
            "json": SCHEMA, "disable_any_whitespace": True}),
    }


@pytest.mark.parametrize("case", ["greedy", "seeded with penalties", "stop string", "json"])
def test_a_stream_cut_anywhere_and_resumed_is_the_uninterrupted_stream(llm: LLM,
                                                                       case: str) -> None:
    params = _cases(llm)[case]
    whole = _deltas(llm, f"{case}-whole", params)
    tokens, text, ending = _flat(whole)
    if case == "stop string":
        assert ending[0] == "stop"
    if case == "json":
        json.loads(text)
    cuts = sorted({0, 1, len(whole) // 3, len(whole) // 2, len(whole) - 2})
    for cut in (c for c in cuts if 0 <= c < len(whole) - 1):
        sent = whole[:cut + 1]
        got_tokens, got_text, _ = _flat(sent)
        steps = [c for d in sent for c in d.completions]
        resume = Resume(tuple(got_tokens), len(got_text), steps[-1].cumulative_logprob or 0.0)
        rest = _deltas(llm, f"{case}-{cut}", params, resume)
        more_tokens, more_text, more_ending = _flat(rest)
        assert got_tokens + more_tokens == tokens, (case, cut)
        assert got_text + more_text == text, (case, cut)
        assert more_ending == ending, (case, cut)
        if params.logprobs is not None:  # the running sum goes on from where it was
            last = [c for d in rest for c in d.completions][-1]
            assert last.cumulative_logprob == pytest.approx(
                [c for d in whole for c in d.completions][-1].cumulative_logprob, abs=1e-3)


def test_bad_resumes_name_what_is_wrong(llm: LLM) -> None:
    engine, vocab = llm.engine, llm.engine.model_config.vocab_size
    bad = [
        (SamplingParams(n=2, temperature=1.0, max_tokens=8), Resume((5,), 0), "n"),
        (SamplingParams(max_tokens=8), Resume((vocab,), 0), "outside the vocabulary"),
        (SamplingParams(max_tokens=2), Resume((5, 6), 0), "max_tokens"),
        (SamplingParams(max_tokens=8), Resume((5,), -1), "sent_chars"),
    ]
    for params, resume, words in bad:
        with pytest.raises(ParamError, match=words):
            engine.add_request("bad", list(PROMPT), params, resume=resume)
        assert not engine.has_unfinished_requests()
