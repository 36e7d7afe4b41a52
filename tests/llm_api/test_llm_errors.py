"""The offline `LLM` API's input errors name the field, chat renders its template, and
abort frees everything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llm_api_helpers import (
    PROMPTS,
    assert_idle,
    greedy,
    ids_prompts,
    make_llm,
    tokens,
)

from zayaserve import LLM, SamplingParams
from zayaserve.replicas.engine.sequence import Status

# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "kwargs"), [
    ("temperature", dict(temperature=-0.5)),
    ("top_p", dict(top_p=0.0)),
    ("top_k", dict(top_k=-3)),
    ("n", dict(n=0)),
    ("max_tokens", dict(max_tokens=0)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=9, max_tokens=4)),
    ("logprobs", dict(logprobs=-1)),
    ("prompt_logprobs", dict(prompt_logprobs=10_000)),
    ("seed", dict(seed="7")),
    ("stop", dict(stop=[""])),
    ("stop_token_ids", dict(stop_token_ids=[-1])),
    ("ignore_eos", dict(ignore_eos="yes")),
])
def test_invalid_sampling_params_name_the_field(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(("field", "kwargs"), [
    ("block_size", dict(block_size=0)),
    ("max_num_seqs", dict(max_num_seqs=0)),
    ("max_num_batched_tokens", dict(max_num_batched_tokens=0)),
    ("num_kv_blocks", dict(num_kv_blocks=0)),
    ("max_model_len", dict(max_model_len=10**9)),
    ("tensor_parallel_size", dict(tensor_parallel_size=2)),
])
def test_invalid_engine_settings_name_the_field(
    tiny_checkpoint: Path, field: str, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match=field):
        LLM(model=str(tiny_checkpoint), **kwargs)


def test_unknown_model_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        LLM(model=str(missing))


def test_bad_prompts_are_rejected_and_nothing_is_left_behind(llm: LLM) -> None:
    params = greedy(4, ignore_eos=True)
    good = ids_prompts(llm, PROMPTS[:3])
    expected = tokens(llm.generate(good, params))
    vocab = llm.engine.model_config.vocab_size
    cases: list[tuple[str, list[Any], Any]] = [
        ("prompt_token_ids", [*good, {"prompt_token_ids": [5, vocab]}], params),
        ("prompt_token_ids", [*good, {"prompt_token_ids": [-1, 5]}], params),
        ("prompt_token_ids", [*good, {"prompt_token_ids": [5, "6"]}], params),
        (r"prompts\[3\]", [*good, 42], params),
        ("prompt", [*good, {"prompt_token_ids": []}], params),
        ("max_model_len", [*good, {"prompt_token_ids": [5] * llm.engine.max_model_len}], params),
        ("sampling_params", good, [params, params]),
        (r"sampling_params\[1\]", good, [params, None, params]),
        (r"sampling_params\[2\]", good, [params, params, {"temperature": 0.0}]),
    ]
    for match, prompts, sp in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompts, sp)
        assert_idle(llm)
        assert tokens(llm.generate(good, params)) == expected


# ---- chat ---------------------------------------------------------------------------------


def test_chat_renders_the_template_and_generates(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    params = greedy(6, ignore_eos=True)
    (out,) = llm.chat(conv, params)
    text = tok.apply_chat_template(conv, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert out.prompt == text and out.prompt_token_ids == ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert out.outputs[0].token_ids == tokens(llm.generate({"prompt_token_ids": ids}, params))[0]

    other = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    both = llm.chat([conv, other], params)
    assert [o.prompt for o in both] == [text, tok.apply_chat_template(other)]
    assert both[0].outputs[0].token_ids == out.outputs[0].token_ids

    (raw,) = llm.chat(conv, params, add_generation_prompt=False)
    assert raw.prompt == tok.apply_chat_template(conv, add_generation_prompt=False) != text


@pytest.mark.parametrize(("match", "conv"), [
    (r"messages\[0\]\.role", [{"role": 5, "content": "x"}]),
    (r"messages\[1\]\.content", [{"role": "user", "content": "x"}, {"role": "user"}]),
    (r"messages\[0\]\.content\[0\]\.type", [{"role": "user", "content": [{"type": "image"}]}]),
    ("unsupported role", [{"role": "robot", "content": "x"}]),
])
def test_chat_rejects_bad_messages(llm: LLM, match: str, conv: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match=match):
        llm.chat(conv, greedy(2))


# ---- abort --------------------------------------------------------------------------------


def test_abort_frees_blocks_and_state_slots(tiny_checkpoint: Path) -> None:
    llm = make_llm(tiny_checkpoint, max_num_seqs=3, block_size=4, num_kv_blocks=64)
    engine = llm.engine
    sched = engine.scheduler
    ids = llm.get_tokenizer().encode("the quick brown fox")
    engine.add_request("forked", ids, SamplingParams(n=3, seed=1, max_tokens=50,
                                                     ignore_eos=True))
    engine.step()  # prefill, then the two children fork in place: all 3 slots taken
    engine.add_request("queued", ids, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("never-run", ids[:2], SamplingParams(max_tokens=50))
    engine.step()
    forked = engine.requests["forked"].seqs
    assert len(forked) == 3 and all(s.status is Status.RUNNING for s in forked)
    assert engine.requests["queued"].seqs[0].status is Status.WAITING
    shared = forked[0].block_table[0]
    assert sched.blocks.ref_count(shared) == 3
    assert sched.blocks.num_free < sched.blocks.num_blocks and sched.slots.num_free == 0

    engine.abort_request("forked")
    assert all(s.status is Status.FINISHED and s.finish_reason == "abort" for s in forked)
    assert sched.blocks.ref_count(shared) == 0
    engine.abort_request("no-such-request")  # unknown ids are ignored
    engine.step()  # the queued ones move in
    assert engine.requests["queued"].seqs[0].status is Status.RUNNING
    engine.abort_request("queued")
    engine.abort_request("never-run")
    assert_idle(llm)
    # The engine keeps working afterwards, with the whole pool.
    (out,) = llm.generate({"prompt_token_ids": ids}, greedy(4, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 4


def test_request_ids_must_be_unique(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("dup", [5, 6], greedy(2))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("dup", [5, 6], greedy(2))
    engine.abort_request("dup")
