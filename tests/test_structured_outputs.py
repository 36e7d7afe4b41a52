"""Structured outputs in the engine: the xgrammar mask in the sampler, a matcher per sequence,
with batching, n > 1, preemption and the prefix cache (random weights, CPU)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from zayaserve.replicas.engine.grammar import Grammars, choice_grammar
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.structured import StructuredOutputsParams
from zayaserve.replicas.llm import LLM
from zayaserve.replicas.validation_errors import ParamError

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["ok", "count", "colour", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["hello there", "the cat sat on", "a b c d e f", "why"]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(model=str(tiny_checkpoint), num_kv_blocks=64)


def _json_params(**kw: Any) -> SamplingParams:
    kw.setdefault("max_tokens", 120)
    return SamplingParams(structured_outputs={"json": SCHEMA, "disable_any_whitespace": True},
                          **kw)


def _texts(outs: list[Any]) -> list[list[tuple[str, str | None]]]:
    return [[(c.text, c.finish_reason) for c in o.outputs] for o in outs]


def test_json_schema_outputs_parse_and_validate_with_n_and_neighbours(llm: LLM) -> None:
    outs = llm.generate(PROMPTS, _json_params(temperature=1.0, seed=7, n=3))
    texts = [c.text for o in outs for c in o.outputs]
    assert len(texts) == 12
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len(set(texts)) > 1  # sampled, not one forced string
    # The schema's property order is kept (xgrammar writes properties in the order given).
    assert all(t.startswith('{"ok":') for t in texts)


def test_constrained_and_free_rows_share_a_batch_without_touching_each_other(llm: LLM) -> None:
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS, free)
    mixed = llm.generate(PROMPTS + PROMPTS, [free] * 4 + [_json_params(temperature=0.0)] * 4)
    assert _texts(mixed[:4]) == _texts(alone)
    for o in mixed[4:]:
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


def test_regex_choice_and_grammar(llm: LLM) -> None:
    regex = r"[a-c]{2,5}@(x|y)\.com"
    outs = llm.generate(PROMPTS, SamplingParams(
        temperature=1.0, seed=1, max_tokens=40, structured_outputs={"regex": regex}))
    for o in outs:
        assert re.fullmatch(regex, o.outputs[0].text), o.outputs[0].text
        assert o.outputs[0].finish_reason == "stop"

    choices = ["yes", 'no "way"', "maybe\\n"]
    outs = llm.generate(PROMPTS * 3, SamplingParams(
        temperature=1.0, seed=2, max_tokens=40, structured_outputs={"choice": choices}))
    got = {o.outputs[0].text for o in outs}
    assert got <= set(choices) and len(got) >= 2

    ebnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    outs = llm.generate(PROMPTS, SamplingParams(
        temperature=1.0, seed=3, max_tokens=60, structured_outputs={"grammar": ebnf}))
    for o in outs:
        text = o.outputs[0].text
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text), text


def test_json_object_mode_yields_an_object(llm: LLM) -> None:
    outs = llm.generate(PROMPTS, SamplingParams(
        temperature=0.0, max_tokens=200, structured_outputs={"json_object": True}))
    finished = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert finished  # random weights may ramble past max_tokens; those that stop must parse
    for c in finished:
        assert isinstance(json.loads(c.text), dict)


def test_preemption_and_prefix_cache_change_nothing(llm: LLM, tiny_checkpoint: Path) -> None:
    params = _json_params(temperature=1.0, seed=11, n=2, max_tokens=80)
    expected = _texts(llm.generate(PROMPTS, params))
    tight = LLM(model=str(tiny_checkpoint), block_size=4, num_kv_blocks=26, max_num_seqs=4)
    assert _texts(tight.generate(PROMPTS, params)) == expected
    assert tight.stats()["num_preemptions"] > 0
    cached = LLM(model=str(tiny_checkpoint), block_size=4, enable_prefix_caching=True)
    assert _texts(cached.generate(PROMPTS, params)) == expected
    assert _texts(cached.generate(PROMPTS, params)) == expected  # second time: prefix hits
    assert cached.stats()["prefix_cache_local_hit_tokens"] > 0


def test_grammar_outranks_min_tokens_and_ends_despite_ignore_eos(llm: LLM) -> None:
    spec = {"choice": ["yes", "no"]}
    outs = llm.generate(PROMPTS, SamplingParams(
        temperature=0.0, max_tokens=30, min_tokens=10, structured_outputs=spec))
    assert all(o.outputs[0].text in ("yes", "no") for o in outs)
    outs = llm.generate(PROMPTS, SamplingParams(
        temperature=0.0, max_tokens=30, ignore_eos=True, structured_outputs=spec))
    assert all(o.outputs[0].text in ("yes", "no") for o in outs)
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)


def test_reported_logprobs_are_the_models_not_the_masks(llm: LLM) -> None:
    """The mask shapes the draw; logprobs stay the raw model's, as for every request."""
    prompt = "the cat sat on"
    out = llm.generate([prompt], SamplingParams(
        temperature=0.0, max_tokens=20, logprobs=0,
        structured_outputs={"regex": "[0-9]{6}"}))[0].outputs[0]
    ids = llm.get_tokenizer().encode(prompt)
    scored = llm.generate([{"prompt_token_ids": ids + list(out.token_ids)}], SamplingParams(
        max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    assert scored is not None and out.logprobs is not None
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        expected = scored[len(ids) + i]
        assert expected is not None
        assert entry[tok].logprob == pytest.approx(expected[tok].logprob, abs=1e-5)


@pytest.mark.parametrize(("spec", "param"), [
    ({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
     "structured_outputs.json"),
    ({"regex": "(unclosed"}, "structured_outputs.regex"),
    ({"grammar": "root ::= missing_rule"}, "structured_outputs.grammar"),
])
def test_bad_constraints_are_refused_when_the_request_arrives(
        llm: LLM, spec: dict[str, Any], param: str) -> None:
    with pytest.raises(ParamError) as err:
        llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=spec))
    assert err.value.param == param and "cannot compile" in str(err.value)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(("spec", "words"), [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["b"]}, "got regex, choice"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"choice": []}, "1 to"),
    ({"choice": "yes"}, "list of strings"),
    ({"regex": "a" * 70_000}, "characters"),
    ({"regex": "a", "surprise": 1}, "unknown field"),
])
def test_spec_validation_names_the_problem(spec: dict[str, Any], words: str) -> None:
    with pytest.raises(ParamError, match=words):
        SamplingParams(structured_outputs=spec)


def test_choice_grammar_escapes_quotes_and_backslashes() -> None:
    assert choice_grammar(['a"b', "c\\d", "e\nf"]) == r'root ::= "a\"b" | "c\\d" | "e\nf"'


def test_choices_beyond_ascii_come_out_whole(llm: LLM) -> None:
    """An astral character (written as a surrogate pair, xgrammar would take it as two bad
    code points and let other bytes through) and accents survive the grammar."""
    choices = ["café", "😀 ok", "x\ty"]
    outs = llm.generate(["a", "b", "c", "d"], SamplingParams(
        temperature=1.0, seed=1, max_tokens=30, structured_outputs={"choice": choices}))
    texts = [o.outputs[0].text for o in outs]
    assert set(texts) <= set(choices), texts


def test_without_xgrammar_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                         llm: LLM) -> None:
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import fails as if not installed
    grammars = Grammars(llm.get_tokenizer(), 512, [3])
    with pytest.raises(ParamError, match=r"zayaserve\[structured\]"):
        grammars.check(StructuredOutputsParams(regex="a"))


def test_models_without_a_tokenizer_refuse_constraints() -> None:
    with pytest.raises(ParamError, match="tokenizer"):
        Grammars(None, 512, [3]).check(StructuredOutputsParams(regex="a"))
