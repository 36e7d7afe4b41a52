"""The offline `LLM` API's stop conditions: stop strings and ids, max_tokens, the context
limit, eos and min_tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from llm_api_helpers import (
    greedy,
    ids_prompts,
    make_llm,
)

from zayaserve import LLM

# ---- stopping -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unconstrained(llm: LLM) -> tuple[list[int], list[int], str]:
    """A greedy run with no stop conditions: (prompt ids, its 24 tokens, its text)."""
    (prompt,) = ids_prompts(llm, ["the quick brown fox"])
    (out,) = llm.generate(prompt, greedy(24, ignore_eos=True))
    return prompt["prompt_token_ids"], out.outputs[0].token_ids, out.outputs[0].text


def _first_new_token_at_or_after(toks: list[int], k: int) -> int:
    """Index of the first token at position >= k that did not occur before it."""
    return next(i for i in range(k, len(toks)) if toks[i] not in toks[:i])


def test_stop_strings_truncate_text(llm: LLM, unconstrained: Any) -> None:
    prompt, full_tokens, full_text = unconstrained
    # A 2-character ASCII stop string that occurs in the output, not at its very start.
    at = next(i for i in range(1, len(full_text) - 1)
              if full_text[i:i + 2].isascii() and full_text[i:i + 2].isalpha())
    stop = full_text[at:at + 2]
    at = full_text.find(stop)
    assert at > 0

    (out,) = llm.generate({"prompt_token_ids": prompt},
                          greedy(24, stop=["never-occurs", stop], ignore_eos=True))
    c = out.outputs[0]
    assert c.text == full_text[:at]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert 0 < len(c.token_ids) < 24 and c.token_ids == full_tokens[:len(c.token_ids)]

    (kept,) = llm.generate({"prompt_token_ids": prompt},
                           greedy(24, stop=stop, include_stop_str_in_output=True,
                                  ignore_eos=True))
    k = kept.outputs[0]
    assert k.text == full_text[:at + len(stop)]
    assert k.finish_reason == "stop" and k.stop_reason == stop
    assert k.token_ids == c.token_ids


def test_stop_token_ids(llm: LLM, unconstrained: Any) -> None:
    prompt, full_tokens, _ = unconstrained
    k = _first_new_token_at_or_after(full_tokens, 2)
    stop_id = full_tokens[k]
    (out,) = llm.generate({"prompt_token_ids": prompt},
                          greedy(24, stop_token_ids=[stop_id], ignore_eos=True))
    c = out.outputs[0]
    assert c.token_ids == full_tokens[:k + 1]  # the stop token itself is kept
    assert c.finish_reason == "stop" and c.stop_reason == stop_id


def test_max_tokens_gives_length(llm: LLM, unconstrained: Any) -> None:
    prompt, full_tokens, _ = unconstrained
    assert not set(full_tokens) & set(llm.engine.eos_ids)
    for n in (1, 5):
        (out,) = llm.generate({"prompt_token_ids": prompt}, greedy(n))
        c = out.outputs[0]
        assert c.token_ids == full_tokens[:n]
        assert c.finish_reason == "length" and c.stop_reason is None


def test_max_model_len_ends_with_length(tiny_checkpoint: Path, unconstrained: Any) -> None:
    prompt, full_tokens, _ = unconstrained
    short = make_llm(tiny_checkpoint, max_model_len=len(prompt) + 3)
    assert short.engine.max_model_len == len(prompt) + 3
    for params in (greedy(20, ignore_eos=True), greedy(None, ignore_eos=True)):
        (out,) = short.generate({"prompt_token_ids": prompt}, params)
        assert out.outputs[0].token_ids == full_tokens[:3]
        assert out.outputs[0].finish_reason == "length"
    (out,) = short.generate({"prompt_token_ids": full_tokens[:len(prompt) + 2]}, greedy(5))
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        short.generate({"prompt_token_ids": full_tokens[:len(prompt) + 3]}, greedy(5))

    # A KV pool smaller than the model's context caps it: one sequence must always fit.
    small_pool = make_llm(tiny_checkpoint, block_size=4, num_kv_blocks=4)
    assert small_pool.engine.max_model_len == 16
    (out,) = small_pool.generate({"prompt_token_ids": prompt}, greedy(20, ignore_eos=True))
    assert out.outputs[0].token_ids == full_tokens[:16 - len(prompt)]
    assert out.outputs[0].finish_reason == "length"


@pytest.fixture(scope="module")
def eos_checkpoint(
    tiny_checkpoint: Path, unconstrained: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, int]:
    """The tiny checkpoint with one of its greedy tokens declared an EOS id in config.json."""
    _, full_tokens, _ = unconstrained
    eos = full_tokens[_first_new_token_at_or_after(full_tokens, 2)]
    path = tmp_path_factory.mktemp("eos") / "tiny-eos"
    shutil.copytree(tiny_checkpoint, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = [cfg["eos_token_id"], eos]
    (path / "config.json").write_text(json.dumps(cfg))
    return path, eos


def test_eos_stops_unless_ignored(eos_checkpoint: Any, unconstrained: Any) -> None:
    path, eos = eos_checkpoint
    prompt, full_tokens, _ = unconstrained
    engine = make_llm(path)
    assert eos in engine.engine.eos_ids
    k = full_tokens.index(eos)
    (out,) = engine.generate({"prompt_token_ids": prompt}, greedy(24))
    c = out.outputs[0]
    assert c.token_ids == full_tokens[:k + 1]
    assert c.finish_reason == "stop" and c.stop_reason is None

    (ignored,) = engine.generate({"prompt_token_ids": prompt}, greedy(24, ignore_eos=True))
    assert ignored.outputs[0].token_ids == full_tokens
    assert ignored.outputs[0].finish_reason == "length"

    # Below min_tokens EOS is banned: the output diverges at k, where EOS was the argmax.
    (late,) = engine.generate({"prompt_token_ids": prompt}, greedy(24, min_tokens=k + 2))
    lt = late.outputs[0].token_ids
    assert lt[:k] == full_tokens[:k]
    assert eos not in lt[:k + 2]


def test_min_tokens_bans_stop_ids_then_follows_the_masked_argmax(
    llm: LLM, unconstrained: Any
) -> None:
    prompt, full_tokens, _ = unconstrained
    first = full_tokens[0]
    params = greedy(8, stop_token_ids=[first], min_tokens=3, logprobs=5)
    (out,) = llm.generate({"prompt_token_ids": prompt}, params)
    c = out.outputs[0]
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    assert first not in c.token_ids[:3]
    assert c.token_ids[0] != full_tokens[0]
    banned = {first, *llm.engine.eos_ids}
    for pos, (tok, lps) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        # Logprobs are raw (before banning), so the top-5 holds the argmax with and without.
        ranked = sorted(lps, key=lambda t: -lps[t].logprob)
        allowed = [t for t in ranked if t not in banned] if pos < 3 else ranked
        assert tok == allowed[0], pos
    if first in c.token_ids:
        assert c.token_ids.index(first) == len(c.token_ids) - 1 >= 3
        assert c.finish_reason == "stop" and c.stop_reason == first
    else:
        assert c.finish_reason in ("length", "stop")
