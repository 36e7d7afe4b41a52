"""L1 prefix caching: a hit resumes exactly where a full recompute would be, because every
cached block carries the CCA conv and recurrent states at its end (not only K/V)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hf_reference import build_hf_checkpoint

from zayaserve import LLM, SamplingParams

BASE = list(range(10, 47))  # 37 tokens: blocks of 4 end mid-prefix and mid-suffix
PROMPTS = [BASE + [200 + i] * k for i, k in enumerate([1, 3, 8, 11])] + [
    BASE[:16], BASE[:17], BASE]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pc")
    build_hf_checkpoint(path, seed=5)  # hybrid + hybrid_sliding layers, window 6
    return path


def _gen(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[Any]:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params)


def _same(a: list[Any], b: list[Any]) -> None:
    for x, y in zip(a, b, strict=True):
        for cx, cy in zip(x.outputs, y.outputs, strict=True):
            assert cx.token_ids == cy.token_ids
            if cx.logprobs is not None:
                for px, py in zip(cx.logprobs, cy.logprobs, strict=True):
                    for tok, lp in px.items():
                        assert abs(lp.logprob - py[tok].logprob) < 1e-4


def test_hits_are_exact_on_and_off_block_boundaries(ckpt: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    cold = _gen(LLM(model=str(ckpt), block_size=4, enable_prefix_caching=False), PROMPTS,
                params)
    llm = LLM(model=str(ckpt), block_size=4, max_num_batched_tokens=7)
    _gen(llm, PROMPTS[:1], params)  # warms the cache with the shared prefix
    warm = _gen(llm, PROMPTS, params)
    _same(cold, warm)
    # 37 shared tokens -> 9 full blocks reused; a 17-token prompt reuses 16, and a 16-token
    # one only 12 (one token must be computed to get logits).
    assert [o.num_cached_tokens for o in warm] == [36, 36, 36, 36, 12, 16, 36]
    assert llm.stats()["prefix_cache_local_hit_tokens"] >= 208


def test_n_greater_than_one_and_seeded_sampling(ckpt: Path) -> None:
    params = SamplingParams(temperature=0.8, max_tokens=8, seed=3, n=3, ignore_eos=True)
    cold = _gen(LLM(model=str(ckpt), block_size=4, enable_prefix_caching=False), [BASE] * 2,
                params)
    llm = LLM(model=str(ckpt), block_size=4)
    first = _gen(llm, [BASE], params)  # three children fork from one prefill, then cache it
    second = _gen(llm, [BASE], params)
    _same(cold, first + second)
    assert first[0].num_cached_tokens == 0 and second[0].num_cached_tokens == 36


def test_exact_after_preemption_and_eviction(ckpt: Path) -> None:
    """A pool too small for the batch: sequences are preempted (recomputing through cached
    blocks) and cached blocks are evicted to make room; answers do not change."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = PROMPTS + [[300 + i] * 9 + BASE[:20] for i in range(4)]
    cold = _gen(LLM(model=str(ckpt), block_size=4, enable_prefix_caching=False), prompts,
                params)
    llm = LLM(model=str(ckpt), block_size=4, num_kv_blocks=40, max_num_batched_tokens=16)
    warm = _gen(llm, prompts, params)
    _same(cold, warm)
    again = _gen(llm, prompts, params)
    _same(cold, again)
    assert llm.stats()["num_preemptions"] > 0


def test_prompt_logprobs_requests_do_not_reuse(ckpt: Path) -> None:
    """Prompt logprobs need logits at every prompt position, so such requests compute all of
    it (as vLLM does); their results equal the uncached engine's."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    cold = _gen(LLM(model=str(ckpt), block_size=4, enable_prefix_caching=False), [BASE],
                params)
    llm = LLM(model=str(ckpt), block_size=4)
    _gen(llm, [BASE], SamplingParams(max_tokens=2))
    warm = _gen(llm, [BASE], params)
    assert warm[0].num_cached_tokens == 0
    for a, b in zip(cold[0].prompt_logprobs[1:], warm[0].prompt_logprobs[1:], strict=True):
        for tok, lp in a.items():
            assert abs(lp.logprob - b[tok].logprob) < 1e-5
    _same(cold, warm)
