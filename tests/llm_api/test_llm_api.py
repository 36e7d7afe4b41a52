"""The offline `LLM` API end to end on the built-in tiny checkpoint: prompt forms, determinism
(greedy and seeded) across batch composition and cache layout, and n > 1 forking, with no
KV/state leaks (`llm_api_helpers`). Stop rules, logprobs and errors: test_llm_stop_rules.py,
test_llm_logprobs.py, test_llm_errors.py."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from llm_api_helpers import (
    PROMPTS,
    greedy,
    ids_prompts,
    make_llm,
    tokens,
)

from zayaserve import LLM, RequestOutput, SamplingParams
from zayaserve.replicas.engine.scheduler import SchedulerOutput

# ---- prompt forms and outputs -------------------------------------------------------------


def test_prompt_forms_give_the_same_results_in_input_order(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    params = greedy(6, ignore_eos=True)
    (single,) = llm.generate("hello world", params)
    assert single.prompt == "hello world"
    assert single.prompt_token_ids == tok.encode("hello world")
    assert single.finished and single.num_cached_tokens == 0
    assert [c.index for c in single.outputs] == [0]
    assert len(single.outputs[0].token_ids) == 6 and single.outputs[0].finish_reason == "length"

    as_text = llm.generate(PROMPTS, params)
    as_ids = llm.generate(ids_prompts(llm, PROMPTS), params)
    as_prompt_dicts = llm.generate([{"prompt": p} for p in PROMPTS], params)
    (as_one_dict,) = llm.generate({"prompt_token_ids": tok.encode("hello world")}, params)
    assert as_one_dict.prompt is None
    assert as_one_dict.outputs[0].token_ids == single.outputs[0].token_ids
    for outs in (as_text, as_ids, as_prompt_dicts):
        assert [o.prompt_token_ids for o in outs] == [tok.encode(p) for p in PROMPTS]
        assert all(o.num_cached_tokens == 0 and o.finished for o in outs)
        assert all([c.index for c in o.outputs] == [0] for o in outs)
    assert [o.prompt for o in as_text] == PROMPTS
    assert [o.prompt for o in as_ids] == [None] * len(PROMPTS)
    assert tokens(as_text) == tokens(as_ids) == tokens(as_prompt_dicts)
    assert len({o.request_id for o in as_text}) == len(PROMPTS)

    # Later prompts finish first (fewer tokens); results still come back in input order.
    lengths = [6, 5, 4, 3, 2, 1, 1]
    per_prompt = [greedy(n, ignore_eos=True) for n in lengths]
    mixed = [p if i % 2 else {"prompt_token_ids": tok.encode(p)} for i, p in enumerate(PROMPTS)]
    outs = llm.generate(mixed, per_prompt)
    assert [o.prompt_token_ids for o in outs] == [tok.encode(p) for p in PROMPTS]
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths
    assert [t[:len(o)] for t, o in zip(tokens(as_text), tokens(outs), strict=True)] == tokens(outs)
    assert llm.generate([], params) == []


def test_text_and_token_ids_agree(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    (out,) = llm.generate("the quick brown fox", greedy(12, ignore_eos=True))
    completion = out.outputs[0]
    assert completion.text == tok.decode(completion.token_ids)
    assert completion.cumulative_logprob is None and completion.logprobs is None
    assert out.prompt_logprobs is None


# ---- determinism --------------------------------------------------------------------------


def test_greedy_is_independent_of_batch_composition(llm: LLM) -> None:
    target = "the quick brown fox"
    others = [p for p in PROMPTS if p != target][:6]
    params = greedy(16, ignore_eos=True)
    (alone,) = tokens(llm.generate(target, params))
    batched = tokens(llm.generate([*others[:3], target, *others[3:]], params))
    assert batched[3] == alone
    assert tokens(llm.generate([target, *others], params))[0] == alone
    # Everyone in the batch equals their own solo run too.
    for prompt, got in zip(others, tokens(llm.generate(others, params)), strict=True):
        assert tokens(llm.generate(prompt, params))[0] == got


def test_greedy_is_independent_of_block_size_and_token_budget(
    llm: LLM, tiny_checkpoint: Path
) -> None:
    params = greedy(16, ignore_eos=True)
    expected = tokens(llm.generate(PROMPTS, params))
    for kwargs in (dict(block_size=3, max_num_batched_tokens=5, max_num_seqs=3),
                   dict(block_size=1, max_num_batched_tokens=2),
                   dict(block_size=64, max_num_batched_tokens=7, num_kv_blocks=16)):
        other = make_llm(tiny_checkpoint, **kwargs)
        assert tokens(other.generate(PROMPTS, params)) == expected, kwargs


def test_seeded_sampling_is_reproducible_across_runs_and_batches(
    llm: LLM, tiny_checkpoint: Path
) -> None:
    target = "hello world"
    seeded = SamplingParams(temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    filtered = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3, max_tokens=12,
                              ignore_eos=True)
    for params in (seeded, filtered):
        (first,) = tokens(llm.generate(target, params))
        assert tokens(llm.generate(target, params)) == [first]
        # Surrounded by other seeded, unseeded and greedy requests, in another position.
        batch = [*PROMPTS[:3], target, *PROMPTS[3:]]
        mix = [SamplingParams(temperature=1.0, max_tokens=5), greedy(3),
               SamplingParams(temperature=1.2, seed=7, max_tokens=9), params,
               SamplingParams(temperature=1.0, max_tokens=12), greedy(1),
               SamplingParams(temperature=0.5, seed=1, max_tokens=4),
               SamplingParams(temperature=1.0, max_tokens=2)]
        assert tokens(llm.generate(batch, mix))[3] == first
        other = make_llm(tiny_checkpoint, block_size=4, max_num_batched_tokens=7, seed=123)
        assert tokens(other.generate([PROMPTS[0], target], params))[1] == first

    runs = [tokens(llm.generate(target, SamplingParams(temperature=1.0, seed=s, max_tokens=12,
                                                       ignore_eos=True)))[0] for s in (1, 2, 3)]
    assert len({tuple(r) for r in runs}) == 3


def test_engine_seed_controls_unseeded_requests(tiny_checkpoint: Path) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)

    def run(seed: int) -> list[list[int]]:
        return tokens(make_llm(tiny_checkpoint, seed=seed).generate(PROMPTS[:3], params))

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c


# ---- n > 1 ---------------------------------------------------------------------------------


def test_n_completions_are_forks_of_one_prompt(llm: LLM) -> None:
    target = "hello world"
    params = SamplingParams(n=3, seed=5, temperature=1.0, max_tokens=8, ignore_eos=True)
    (out,) = llm.generate(target, params)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    got = [c.token_ids for c in out.outputs]
    assert all(len(t) == 8 for t in got)
    assert len({tuple(t) for t in got}) > 1
    assert [c.token_ids for c in llm.generate(target, params)[0].outputs] == got
    # Completion i draws from seed 5 + i: it must equal a lone n=1 request with that seed,
    # which proves the forked child's KV blocks and CCA state are the parent's.
    for i in range(3):
        alone = SamplingParams(seed=5 + i, temperature=1.0, max_tokens=8, ignore_eos=True)
        assert tokens(llm.generate(target, alone))[0] == got[i]

    (g,) = llm.generate(target, greedy(8, n=3, ignore_eos=True))
    assert [c.index for c in g.outputs] == [0, 1, 2]
    assert g.outputs[0].token_ids == g.outputs[1].token_ids == g.outputs[2].token_ids
    assert g.outputs[0].token_ids == tokens(llm.generate(target, greedy(8, ignore_eos=True)))[0]


class _TokenCounter:
    def __init__(self, llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
        self.total = 0
        self.steps: list[int] = []
        prepare = llm.engine.runner.prepare

        def counted(sched: SchedulerOutput) -> Any:
            self.total += sched.num_tokens
            self.steps.append(sched.num_tokens)
            return prepare(sched)

        monkeypatch.setattr(llm.engine.runner, "prepare", counted)


def test_n_prefills_the_prompt_once(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = ids_prompts(llm, ["the quick brown fox"])[0]
    prompt_len = len(prompt["prompt_token_ids"])
    counter = _TokenCounter(llm, monkeypatch)
    params = SamplingParams(n=3, seed=5, temperature=1.0, max_tokens=4, ignore_eos=True)
    (out,) = llm.generate(prompt, params)
    assert [len(c.token_ids) for c in out.outputs] == [4, 4, 4]
    # One prefill, then 3 decode steps of 3 sequences each.
    assert counter.steps == [prompt_len, 3, 3, 3]
    assert counter.total == prompt_len + 3 * 3


def test_n_with_no_room_to_fork_or_a_tiny_kv_pool_gives_the_same_results(
    llm: LLM, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = ids_prompts(llm, ["the quick brown fox", "hello world"])
    prompt_len = len(prompts[0]["prompt_token_ids"])
    cases = [greedy(8, n=3, ignore_eos=True),
             SamplingParams(n=3, seed=5, temperature=1.0, max_tokens=8, ignore_eos=True)]

    def completions(engine: LLM, params: SamplingParams) -> list[list[list[int]]]:
        outs = engine.generate(prompts, params)
        return [[c.token_ids for c in o.outputs] for o in outs]

    expected = [completions(llm, p) for p in cases]

    # One running sequence at a time: children cannot fork in place and recompute the prompt.
    one_at_a_time = make_llm(tiny_checkpoint, max_num_seqs=1)
    counter = _TokenCounter(one_at_a_time, monkeypatch)
    assert [completions(one_at_a_time, p) for p in cases] == expected
    assert counter.total >= 2 * 3 * prompt_len

    # 8 blocks of 4 tokens: 3 completions of 21 tokens cannot all be resident.
    tiny_pool = make_llm(tiny_checkpoint, block_size=4, num_kv_blocks=8)
    assert [completions(tiny_pool, p) for p in cases] == expected
    assert tiny_pool.stats()["num_preemptions"] > 0


def _summary(outs: list[RequestOutput]) -> list[Any]:
    """Everything a client sees, logprobs rounded (recompute may move the last bits)."""
    def lps(d: dict[int, Any] | None) -> Any:
        return None if d is None else sorted((t, round(lp.logprob, 3)) for t, lp in d.items())

    return [(None if o.prompt_logprobs is None else [lps(d) for d in o.prompt_logprobs],
             [(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason,
               None if c.logprobs is None else [lps(d) for d in c.logprobs])
              for c in o.outputs])
            for o in outs]


def test_mixed_requests_under_memory_pressure_match_a_roomy_engine(
    llm: LLM, tiny_checkpoint: Path
) -> None:
    """Greedy and seeded requests, n up to 3, logprobs and prompt logprobs, through chunked
    prefill, forks, copy-on-write and preemption: nothing a client sees may change."""
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(4, 512) for _ in range(rng.randrange(1, 20))]}
               for _ in range(10)]
    params = []
    for i in range(10):
        common: dict[str, Any] = dict(
            n=rng.choice([1, 1, 2, 3]), max_tokens=rng.randrange(1, 12),
            prompt_logprobs=rng.choice([None, 2]), logprobs=rng.choice([None, 1]))
        if i % 2:
            params.append(SamplingParams(temperature=0.0, **common))
        else:
            params.append(SamplingParams(temperature=1.0, seed=i, top_k=rng.choice([0, 5]),
                                         **common))
    expected = _summary(llm.generate(prompts, params))
    for kwargs in (dict(block_size=2, num_kv_blocks=20, max_num_batched_tokens=7),
                   dict(block_size=4, num_kv_blocks=9, max_num_seqs=3, max_num_batched_tokens=5),
                   dict(block_size=1, num_kv_blocks=40, max_num_seqs=4)):
        tight = make_llm(tiny_checkpoint, **kwargs)
        assert _summary(tight.generate(prompts, params)) == expected, kwargs
        assert tight.stats()["num_preemptions"] > 0, kwargs
