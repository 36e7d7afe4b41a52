"""Async scheduling and the output thread give the synchronous engine's outputs, byte for
byte: every case runs on two engines over the same checkpoint, one with `async_scheduling=False`
and its outputs made inline after each step (`output_thread=False`), the other with both on,
and compares whole outputs (token ids, text, logprobs, finish and stop reasons, cached tokens).
Each case also checks that steps really were scheduled ahead where they can be, so a pipeline
that silently fell back to synchronous steps could not pass (`test_output_thread.py` shows the
output thread's outputs really are made off the step loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_redis_store import RedisServer, needs_redis

from zayaserve import LLM, RSAParams, SamplingParams

PROMPTS = [[2, *range(30 + i, 40 + 3 * i)] for i in range(6)]


def _pair(ckpt: Path, **kw: Any) -> tuple[LLM, LLM]:
    return (LLM(model=str(ckpt), async_scheduling=False, output_thread=False, **kw),
            LLM(model=str(ckpt), async_scheduling=True, output_thread=True, **kw))


def _flat(outs: list[Any]) -> list[Any]:
    return [(o.prompt_token_ids, o.num_cached_tokens, o.prompt_logprobs,
             [(c.index, c.token_ids, c.text, c.logprobs, c.cumulative_logprob,
               c.finish_reason, c.stop_reason) for c in o.outputs]) for o in outs]


def _same(sync: LLM, fast: LLM, prompts: Any, params: Any, ahead: bool = True) -> list[Any]:
    before = fast.engine.pipeline.steps_ahead
    a = sync.generate(prompts, params)
    b = fast.generate(prompts, params)
    assert _flat(a) == _flat(b)
    assert sync.engine.pipeline.steps_ahead == 0 and sync.engine.output_thread is None
    assert fast.engine.output_thread is not None
    assert (fast.engine.pipeline.steps_ahead > before) == ahead
    return a


def _ids(prompts: list[list[int]]) -> list[dict[str, Any]]:
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.fixture(scope="module")
def pair(tiny_checkpoint: Path) -> tuple[LLM, LLM]:
    return _pair(tiny_checkpoint, enable_prefix_caching=False)


def test_greedy_and_seeded_n(pair: tuple[LLM, LLM]) -> None:
    _same(*pair, _ids(PROMPTS), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    seeded = [SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=7 + i, max_tokens=12 + i,
                             logprobs=2, ignore_eos=True) for i in range(len(PROMPTS))]
    outs = _same(*pair, _ids(PROMPTS), seeded)
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1  # the n samples differ


def test_unseeded_draws_follow_the_engine_seed(tiny_checkpoint: Path) -> None:
    """Unseeded sequences get their seeds in arrival order, so even they replay exactly."""
    sync, fast = _pair(tiny_checkpoint, enable_prefix_caching=False, seed=3)
    _same(sync, fast, _ids(PROMPTS), SamplingParams(temperature=1.0, max_tokens=16))


def test_stop_strings_eos_and_mixed_lengths(pair: tuple[LLM, LLM]) -> None:
    """Sequences that end at different steps, by eos, a stop string cut across deltas or a
    stop token, while the next step (with them in it) is already running."""
    sync, _ = pair
    free = sync.generate(_ids(PROMPTS), SamplingParams(temperature=0, max_tokens=30,
                                                       ignore_eos=True))
    params = []
    for i, o in enumerate(free):
        text, ids = o.outputs[0].text, o.outputs[0].token_ids
        stop = text[8 + i: 11 + i] if len(text) > 12 + i and i < 4 else None
        params.append(SamplingParams(
            temperature=0, max_tokens=10 + 3 * i, stop=[stop] if stop else None,
            stop_token_ids=[ids[5 + i]] if i in (1, 3) else None, ignore_eos=i >= 4,
            include_stop_str_in_output=i == 2))
    outs = _same(*pair, _ids(PROMPTS), params)
    reasons = {c.finish_reason for o in outs for c in o.outputs}
    assert reasons == {"stop", "length"}


def test_preemption(tiny_checkpoint: Path) -> None:
    """Too few blocks for everyone: sequences are preempted and recomputed in both modes."""
    sync, fast = _pair(tiny_checkpoint, enable_prefix_caching=False, block_size=4,
                       num_kv_blocks=24, max_num_seqs=6)
    _same(sync, fast, _ids(PROMPTS), SamplingParams(temperature=0.8, seed=5, max_tokens=20,
                                                    ignore_eos=True))
    assert sync.engine.scheduler.num_preemptions > 0
    assert fast.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_l1(tiny_checkpoint: Path) -> None:
    sync, fast = _pair(tiny_checkpoint, block_size=4)
    shared = list(range(50, 75))
    prompts = _ids([shared + [i] for i in range(4)])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    _same(sync, fast, prompts, params)
    outs = _same(sync, fast, prompts, params)  # now every prompt hits
    assert all(o.num_cached_tokens >= 24 for o in outs)


@pytest.mark.redis
@needs_redis
def test_prefix_cache_hits_l2(tiny_checkpoint: Path, tmp_path: Path) -> None:
    srv = RedisServer(tmp_path)
    srv.start()
    try:
        kw = dict(block_size=4, kv_cache_redis_url=srv.url(),
                  kv_cache_secret="async-test-secret-0123")
        writer = LLM(model=str(tiny_checkpoint), **kw)
        shared = list(range(80, 110))
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        writer.generate(_ids([shared + [1]]), params)
        assert writer.engine.remote is not None and writer.engine.remote.store.flush(10)
        sync, fast = _pair(tiny_checkpoint, **kw)  # empty L1s: the prefix comes from Redis
        outs = _same(sync, fast, _ids([shared + [2], shared + [3]]), params)
        assert all(o.num_cached_tokens >= 28 for o in outs)
    finally:
        srv.stop()


def test_structured_outputs_penalties_and_prompt_logprobs_wait(pair: tuple[LLM, LLM]) -> None:
    """Steps whose next sampling needs this step's token (a grammar to advance, penalties,
    prompt logprobs) are never scheduled ahead, and still match."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=40,
                            structured_outputs={"json": schema})
    _same(*pair, _ids(PROMPTS[:3]), params, ahead=False)
    _same(*pair, _ids(PROMPTS[:3]), SamplingParams(
        temperature=0.7, seed=2, max_tokens=10, repetition_penalty=1.3, ignore_eos=True),
        ahead=False)
    _same(*pair, _ids(PROMPTS[:2]), SamplingParams(
        temperature=0, max_tokens=6, prompt_logprobs=2, ignore_eos=True), ahead=False)
    # One constrained request among free ones holds every step back while it runs.
    mixed = [params] + [SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)] * 2
    _same(*pair, _ids(PROMPTS[:3]), mixed)


def test_chat_with_tools_and_min_tokens(pair: tuple[LLM, LLM]) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object",
                                              "properties": {"city": {"type": "string"}}}}}]
    sync, fast = pair
    conv = [{"role": "user", "content": "weather in Paris?"}]
    params = SamplingParams(temperature=0.9, seed=1, max_tokens=24, min_tokens=6)
    a, b = sync.chat(conv, params, tools=tools), fast.chat(conv, params, tools=tools)
    assert _flat(a) == _flat(b)


def test_rsa(tiny_checkpoint: Path) -> None:
    sync, fast = _pair(tiny_checkpoint, num_kv_blocks=1024, block_size=4, max_model_len=1024)
    rsa = RSAParams(n=4, k=2, t=2, tail_tokens=12, round_max_tokens=16, final_max_tokens=16,
                    seed=11, final_n=2)
    messages = [{"role": "user", "content": "What is 6 times 7?"}]
    a, b = sync.rsa(messages, rsa), fast.rsa(messages, rsa)
    assert _flat(a.answers) == _flat(b.answers)
    assert fast.engine.pipeline.steps_ahead > 0


def test_a_failing_step_also_ends_the_step_launched_after_it(tiny_checkpoint: Path) -> None:
    """A fault in step N while N+1 is already running: the engine raises, N+1 is waited out,
    both steps' requests are the ones named for failure, and the engine goes on exactly."""
    llm = LLM(model=str(tiny_checkpoint), enable_prefix_caching=False)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", p, params)
    for _ in range(4):
        engine.step()
    assert engine.pipeline.ahead is not None
    real = engine.runner.execute
    calls = {"n": 0}

    def flaky(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real(*args, **kw)

    engine.runner.execute = flaky  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="injected"):
        while True:
            engine.step()
    assert engine.pipeline.ahead is None
    assert engine.last_step_request_ids == {"r0", "r1", "r2"}
    for rid in ("r0", "r1", "r2"):
        engine.abort_request(rid)
    engine.runner.execute = real  # type: ignore[method-assign]
    assert engine.scheduler.blocks.num_free == engine.cache.num_blocks
    again = _pair(tiny_checkpoint, enable_prefix_caching=False)[0]
    assert _flat(llm.generate(_ids(PROMPTS[:2]), params)) == _flat(
        again.generate(_ids(PROMPTS[:2]), params))


def test_stream_deltas_and_their_reasoning_split_match(tiny_checkpoint: Path) -> None:
    """Step by step, each request gets the same deltas (tokens, text, finish) in both modes,
    so what a front end makes of the stream, e.g. the reasoning split of a `<think>` opened by
    the prompt, is the same too."""
    from zayaserve.cluster.frontend.reasoning import ThinkParser

    def deltas(llm: LLM) -> dict[str, list[tuple[Any, ...]]]:
        engine = llm.engine
        params = SamplingParams(temperature=0.9, seed=3, max_tokens=28, stop=["e"],
                                ignore_eos=True)
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"r{i}", p, params)
        out: dict[str, list[tuple[Any, ...]]] = {}
        while engine.has_unfinished_requests():
            for d in engine.step():
                out.setdefault(d.request_id, []).extend(
                    (c.token_ids, c.text, c.finish_reason) for c in d.completions)
        return out

    sync, fast = _pair(tiny_checkpoint, enable_prefix_caching=False)
    a, b = deltas(sync), deltas(fast)
    assert a == b and fast.engine.pipeline.steps_ahead > 0

    def split(stream: list[tuple[Any, ...]]) -> list[tuple[str, str]]:
        parser = ThinkParser(thinking=True)
        return [parser.feed(text) for _, text, _ in stream]

    assert {r: split(s) for r, s in a.items()} == {r: split(s) for r, s in b.items()}
