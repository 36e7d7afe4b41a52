"""The offline `LLM` API end to end on the built-in tiny checkpoint: prompt forms, determinism
(greedy and seeded) across batch composition and cache layout, n > 1 forking, stop conditions,
logprobs against the transformers oracle, input errors, chat, abort, and no KV/state leaks."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_reference import build_hf_checkpoint

from zayaserve import LLM, RequestOutput, SamplingParams
from zayaserve.replicas.engine.scheduler import SchedulerOutput
from zayaserve.replicas.engine.sequence import Status

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


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    yield
    try:
        for llm in _module_llms + _test_llms:
            assert_idle(llm)
    finally:
        _test_llms.clear()


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> Iterator[LLM]:
    llm = make_llm(tiny_checkpoint, keep=True)
    yield llm
    _module_llms.remove(llm)


def greedy(max_tokens: int | None = 8, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def tokens(outs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def ids_prompts(llm: LLM, texts: list[str]) -> list[dict[str, list[int]]]:
    tok = llm.get_tokenizer()
    return [{"prompt_token_ids": tok.encode(t)} for t in texts]


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
