"""A constrained output obeys its grammar, as a property: for three tokenizer kinds (the
built-in byte-level BPE, a Gemma-style one with metaspace and `<0xNN>` byte fallback, and one
with special tokens added inside the id range) and every kind of constraint
(tests/structured_cases.py), hundreds of seeded high-temperature samples on random weights;
every output that finishes with `stop` must pass its strict check (json.loads + jsonschema,
re.fullmatch, membership, a parser), and one that fails it is a defect, never "random weights".
A `length` finish is allowed to be incomplete, and says so."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xgrammar  # noqa: F401  (the `structured` extra: tests/run.sh installs it)
from structured_cases import CASES, Case

from zayaserve import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SAMPLES = 200
TEMPERATURE = 1.5
# A case whose samples never complete would prove nothing: at least this many must.
MIN_STOPS = 10
TOKENIZER_KINDS = ("bytelevel", "gemma", "special")
PROMPT = "Answer in the required format:"


@pytest.fixture(scope="module", params=TOKENIZER_KINDS)
def kind_llm(request: pytest.FixtureRequest, tiny_checkpoint: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LLM]]:
    kind = request.param
    if kind == "bytelevel":
        path = tiny_checkpoint
    else:
        from tokenizer_kinds import write_checkpoint

        path = write_checkpoint(tmp_path_factory.mktemp(f"tok-{kind}"), kind)
    llm = LLM(model=str(path), max_num_seqs=SAMPLES)
    yield kind, llm


def _sample(llm: LLM, case: Case, seeds: range) -> list[Any]:
    params = [SamplingParams(temperature=TEMPERATURE, max_tokens=case.max_tokens, seed=seed,
                             structured_outputs=case.spec) for seed in seeds]
    return [out.outputs[0] for out in llm.generate([PROMPT] * len(params), params)]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.name}-{SAMPLES}-samples" for c in CASES])
def test_every_output_that_stops_passes_its_strict_check(kind_llm: tuple[str, LLM],
                                                         case: Case) -> None:
    kind, llm = kind_llm
    outs = _sample(llm, case, range(SAMPLES))
    stopped = [o for o in outs if o.finish_reason == "stop"]
    invalid = [o.text for o in stopped if not case.valid(o.text)]
    assert {o.finish_reason for o in outs} <= {"stop", "length"}
    # `length` is honest too: a text its grammar had completed would have been `stop`.
    complete_but_length = [o.text for o in outs if o.finish_reason == "length"
                           and case.valid(o.text)]
    assert not complete_but_length, complete_but_length[:5]
    print(f"\n[structured] tokenizer={kind} constraint={case.name} samples={len(outs)} "
          f"stop={len(stopped)} length={len(outs) - len(stopped)} invalid={len(invalid)}")
    assert not invalid, f"{len(invalid)} of {len(stopped)} `stop` outputs fail: {invalid[:5]!r}"
    assert len(stopped) >= MIN_STOPS, (
        f"only {len(stopped)} of {len(outs)} samples completed: raise the case's max_tokens")


REPRO_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                "required": ["city"]}


def test_the_reported_repro_gives_no_invalid_output(tiny_checkpoint: Path) -> None:
    """24 seeded samples at temperature 1 and 400 tokens of a `maxLength` string: 5 of 24 once
    ended `stop` with raw control characters inside the string."""
    import json

    llm = LLM(model=str(tiny_checkpoint))
    params = [SamplingParams(temperature=1.0, max_tokens=400, seed=seed,
                             structured_outputs={"json": REPRO_SCHEMA}) for seed in range(24)]
    outs = [o.outputs[0] for o in llm.generate(["Give me a city as JSON:"] * 24, params)]
    invalid = []
    for out in outs:
        try:
            json.loads(out.text)
        except json.JSONDecodeError:
            if out.finish_reason == "stop":
                invalid.append(out.text)
    stopped = sum(o.finish_reason == "stop" for o in outs)
    print(f"\n[structured] the reported repro: {len(invalid)}/24 invalid, {stopped}/24 stop")
    assert not invalid and stopped == 24, invalid


def test_stop_strings_cannot_cut_a_constrained_text() -> None:
    from zayaserve.replicas.validation_errors import ParamError

    with pytest.raises(ParamError) as err:
        SamplingParams(stop=["}"], structured_outputs={"json": REPRO_SCHEMA})
    assert err.value.param == "stop" and "structured_outputs" in str(err.value)


def test_stop_token_ids_end_a_constrained_text_only_where_it_is_complete(
        tiny_checkpoint: Path) -> None:
    """A stop token id becomes one of the grammar's stop tokens: it may be sampled only where
    the text is complete, so it never cuts a constrained text short."""
    import re

    llm = LLM(model=str(tiny_checkpoint))
    tokenizer = llm.engine.tokenizer
    assert tokenizer is not None
    stop_id = tokenizer.encode("e", add_special_tokens=False)[0]
    params = [SamplingParams(temperature=1.5, max_tokens=32, seed=seed, stop_token_ids=[stop_id],
                             structured_outputs={"regex": "[a-z]{2,6}"}) for seed in range(64)]
    outs = [o.outputs[0] for o in llm.generate(["Letters:"] * 64, params)]
    for out in outs:
        assert out.finish_reason == "stop" and re.fullmatch("[a-z]{2,6}", out.text), out
    by_stop_id = sum(o.stop_reason == stop_id for o in outs)
    print(f"\n[structured] {by_stop_id}/64 ended on the stop token id, all complete")
