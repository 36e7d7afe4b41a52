"""The offline `LLM` API's logprobs against the transformers oracle."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from hf_reference import build_hf_checkpoint
from llm_api_helpers import (
    _module_llms,
    greedy,
    make_llm,
)

from zayaserve import LLM, SamplingParams

# ---- logprobs against the transformers oracle ---------------------------------------------


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LLM, list[int]]:
    path = tmp_path_factory.mktemp("hf_logprobs")
    model = build_hf_checkpoint(path, seed=11)
    engine = make_llm(path, keep=True, block_size=4, num_kv_blocks=64)
    rng = random.Random(3)
    prompt = [rng.randrange(6, model.config.vocab_size) for _ in range(9)]
    yield model, engine, prompt
    _module_llms.remove(engine)


@torch.no_grad()
def _reference_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: log-softmax of the next-token prediction at every position."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _check_ranks(entries: dict[int, Any], ref_row: torch.Tensor, k: int) -> None:
    top = ref_row.topk(k)
    ranked = sorted(entries.items(), key=lambda kv: -kv[1].logprob)
    assert [t for t, _ in ranked][:k] == top.indices.tolist()
    assert [lp.rank for _, lp in ranked][:k] == list(range(1, k + 1))
    for tid, lp in entries.items():
        assert abs(lp.logprob - ref_row[tid].item()) < 1e-4
        assert lp.rank == 1 + int((ref_row > ref_row[tid] + 1e-6).sum())


def test_logprobs_match_the_reference(hf_case: Any) -> None:
    model, engine, prompt = hf_case
    params = greedy(5, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    (out,) = engine.generate({"prompt_token_ids": prompt}, params)
    c = out.outputs[0]
    ref = _reference_logprobs(model, prompt + c.token_ids)
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == 5
    total = 0.0
    for j, (tok, entries) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + j]
        assert tok in entries and len(entries) in (3, 4)
        assert entries[tok].rank == 1 and tok == int(row.argmax())
        _check_ranks(entries, row, 3)
        total += entries[tok].logprob
    assert c.cumulative_logprob is not None
    assert abs(c.cumulative_logprob - total) < 1e-5
    ref_total = sum(ref[len(prompt) - 1 + j, t].item() for j, t in enumerate(c.token_ids))
    assert abs(c.cumulative_logprob - ref_total) < 1e-4

    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    for i in range(1, len(prompt)):
        entries = plp[i]
        assert entries is not None and prompt[i] in entries and len(entries) in (2, 3)
        _check_ranks(entries, ref[i - 1], 2)


def test_sampled_logprobs_are_raw_model_logprobs(hf_case: Any) -> None:
    """With temperature and top-k the reported logprobs still describe the model itself."""
    model, engine, prompt = hf_case
    params = SamplingParams(temperature=1.7, top_k=30, seed=9, max_tokens=6, logprobs=2,
                            ignore_eos=True)
    (out,) = engine.generate({"prompt_token_ids": prompt}, params)
    c = out.outputs[0]
    ref = _reference_logprobs(model, prompt + c.token_ids)
    assert c.logprobs is not None and c.cumulative_logprob is not None
    for j, (tok, entries) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        _check_ranks(entries, ref[len(prompt) - 1 + j], 2)
        assert tok in entries
    assert abs(c.cumulative_logprob - sum(e[t].logprob for t, e in
                                          zip(c.token_ids, c.logprobs, strict=True))) < 1e-5


def test_zero_logprobs_hold_just_the_chosen_token(hf_case: Any) -> None:
    model, engine, prompt = hf_case
    (out,) = engine.generate({"prompt_token_ids": prompt},
                             greedy(3, logprobs=0, prompt_logprobs=0, ignore_eos=True))
    c = out.outputs[0]
    ref = _reference_logprobs(model, prompt + c.token_ids)
    assert c.logprobs is not None and out.prompt_logprobs is not None
    for j, (tok, entries) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        assert list(entries) == [tok]
        assert abs(entries[tok].logprob - ref[len(prompt) - 1 + j, tok].item()) < 1e-4
    for i, entries in enumerate(out.prompt_logprobs[1:], start=1):
        assert entries is not None and list(entries) == [prompt[i]]
        assert abs(entries[prompt[i]].logprob - ref[i - 1, prompt[i]].item()) < 1e-4

    (one,) = engine.generate({"prompt_token_ids": prompt[:1]}, greedy(2, prompt_logprobs=0))
    assert one.prompt_logprobs == [None]


def test_text_needs_a_tokenizer(hf_case: Any) -> None:
    """The oracle checkpoint has no tokenizer: text in and stop strings must be refused, not
    silently ignored; token ids still work."""
    _, engine, prompt = hf_case
    with pytest.raises(ValueError, match="prompt"):
        engine.generate("hello")
    with pytest.raises(ValueError, match="messages"):
        engine.chat([{"role": "user", "content": "hello"}])
    with pytest.raises(ValueError, match="stop"):
        engine.generate({"prompt_token_ids": prompt}, greedy(4, stop=["x"]))
    (out,) = engine.generate({"prompt_token_ids": prompt}, greedy(4, ignore_eos=True))
    assert out.outputs[0].text == "" and len(out.outputs[0].token_ids) == 4
