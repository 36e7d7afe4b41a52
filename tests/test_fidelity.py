"""zayaserve against transformers' ZayaForCausalLM: prompt logprobs within 1e-4 (fp32) and
identical greedy continuations, through every chunk, block and CCA-state hand-over."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from hf_reference import build_hf_checkpoint, reference_greedy, reference_prompt_logprobs

from zayaserve import LLM, SamplingParams

CONFIGS: dict[str, dict[str, Any]] = {
    # alternating full / sliding-window layers, the default CCA kernels
    "hybrid+sliding": {},
    # many experts, longer depthwise kernel, untied lm_head with bias, biased projections
    "64-experts-t0=3": dict(num_experts=64, cca_time0=3, cca_time1=2, tie_word_embeddings=False,
                            lm_head_bias=True, attention_bias=True),
    # only sliding layers, grouped conv kernel 3, depthwise kernel 1, GQA 8:2
    "sliding-t1=3": dict(layer_types=["hybrid_sliding"] * 2, num_hidden_layers=2, cca_time0=1,
                         cca_time1=3, num_attention_heads=8, head_dim=8, sliding_window=4),
}
GEN_TOKENS = 32


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(request.param.replace("+", "_").replace("=", ""))
    model = build_hf_checkpoint(path, seed=len(request.param), **CONFIGS[request.param])
    prompts = _prompts(model.config.vocab_size, [1, 5, 13, 21, 34], seed=7)
    refs = [(reference_prompt_logprobs(model, p), reference_greedy(model, p, GEN_TOKENS))
            for p in prompts]
    return path, prompts, refs


def _check(llm: LLM, prompts: list[list[int]], refs: list[Any]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=GEN_TOKENS, ignore_eos=True,
                            prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert len(outs) == len(prompts)
    for prompt, out, (ref_lp, ref_tokens) in zip(prompts, outs, refs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
        got = torch.tensor([out.prompt_logprobs[i][tok].logprob
                            for i, tok in enumerate(prompt) if i > 0])
        assert got.shape == ref_lp.shape
        if len(prompt) > 1:
            assert (got - ref_lp).abs().max().item() < 1e-4
        assert out.outputs[0].token_ids == ref_tokens
        assert out.outputs[0].finish_reason == "length"


def test_whole_prompts_in_one_step(case: Any) -> None:
    path, prompts, refs = case
    _check(LLM(model=str(path), block_size=16, max_num_batched_tokens=4096), prompts, refs)


def test_tiny_blocks_and_chunks_hit_every_boundary(case: Any) -> None:
    """Block size 2 and 5-token prefill chunks: every block edge and CCA hand-over is crossed,
    and decodes share steps with other sequences' prefill chunks."""
    path, prompts, refs = case
    llm = LLM(model=str(path), block_size=2, max_num_batched_tokens=5, max_num_seqs=3)
    _check(llm, prompts, refs)


def test_preemption_by_recompute_changes_nothing(case: Any) -> None:
    path, prompts, refs = case
    # 40 blocks of 3 tokens cannot hold five sequences of up to 66 tokens at once.
    llm = LLM(model=str(path), block_size=3, num_kv_blocks=40, max_num_batched_tokens=16)
    _check(llm, prompts, refs)
    assert llm.stats()["num_preemptions"] > 0


def test_random_weights_make_continuations_differ(case: Any) -> None:
    """Guards the oracle itself: if all prompts continued alike the comparison proves little."""
    _, _, refs = case
    first_tokens = {tokens[0] for _, tokens in refs}
    assert len(first_tokens) >= 3
    assert len({tuple(tokens) for _, tokens in refs}) == len(refs)


@pytest.mark.parametrize("micro_batches", [2, 3, 4])
def test_micro_batch_overlap_is_exact(case: Any, micro_batches: int) -> None:
    """N micro-batches on N threads (the disaggregated overlap mode) change nothing."""
    path, prompts, refs = case
    llm = LLM(model=str(path), block_size=3, max_num_batched_tokens=9,
              micro_batches=micro_batches)
    _check(llm, prompts, refs)
