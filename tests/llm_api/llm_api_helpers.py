"""What the offline `LLM` API tests share: the prompts, an LLM whose KV blocks and state slots
are checked for leaks after every test, and small helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zayaserve import LLM, RequestOutput, SamplingParams

PROMPTS = ["hi", "hello world", "the quick brown fox", "one two three", "abc", "Zyphra",
           "a b c d e f g"]
KV_BLOCKS = 512  # 8k tokens: roomy for these prompts, small enough to allocate quickly

_module_llms: list[LLM] = []
_test_llms: list[LLM] = []


def make_llm(path: Path | str, keep: bool = False, **kwargs: Any) -> LLM:
    """An LLM whose pools are checked for leaks after every test that uses it."""
    kwargs.setdefault("num_kv_blocks", KV_BLOCKS)
    llm = LLM(model=str(path), **kwargs)
    (_module_llms if keep else _test_llms).append(llm)
    return llm


def assert_idle(llm: LLM) -> None:
    """Nothing in flight, and every KV block and CCA state slot back in its pool."""
    engine = llm.engine
    sched = engine.scheduler
    assert not engine.has_unfinished_requests() and not engine.requests
    assert not sched.running and not sched.waiting
    assert sched.blocks.num_free == sched.blocks.num_blocks
    assert all(sched.blocks.ref_count(b) == 0 for b in range(sched.blocks.num_blocks))
    assert sched.slots.num_free == sched.slots.num_slots
    assert sorted(sched.slots._free) == list(range(sched.slots.num_slots))


def greedy(max_tokens: int | None = 8, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def tokens(outs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def ids_prompts(llm: LLM, texts: list[str]) -> list[dict[str, list[int]]]:
    tok = llm.get_tokenizer()
    return [{"prompt_token_ids": tok.encode(t)} for t in texts]
