"""The output processor on its own thread: outputs are made off the step loop, a stop string
the engine hears of late costs it tokens but never changes what a client gets, and a failure
there ends only the requests it concerns. Compared against an engine that makes its outputs
inline after each synchronous step.

While the engine has not yet heard of a stop string, the stopped sequence still takes a row in
its steps, so the others share their steps with a different batch than on the synchronous
path. This CPU build's matmuls are not batch-invariant: their logits, and so their logprobs,
can then differ in the last bits (1e-6 here). Token ids, texts, finish and stop reasons are
compared exactly; logprobs to 1e-4. (`test_async_scheduling.py` shows them byte-identical
where the batches are the same.)"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from zayaserve import LLM, SamplingParams
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine, RequestFailedError
from zayaserve.replicas.engine.outputs import RequestOutputBuilder

PROMPTS = [[2, *range(40 + i, 52 + 2 * i)] for i in range(6)]


def _flat(outs: list[Any]) -> list[Any]:
    return [(o.prompt_token_ids, o.num_cached_tokens, o.prompt_logprobs,
             [(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason)
              for c in o.outputs]) for o in outs]


def _logprobs(outs: list[Any]) -> list[float]:
    flat = []
    for o in outs:
        for c in o.outputs:
            if c.logprobs is not None:
                flat.append(c.cumulative_logprob)
                flat.extend(lp.logprob for d in c.logprobs for lp in d.values())
                flat.extend(lp.rank for d in c.logprobs for lp in d.values())
    return flat


def _same(got: list[Any], expected: list[Any]) -> None:
    assert _flat(got) == _flat(expected)
    a, b = _logprobs(got), _logprobs(expected)
    assert len(a) == len(b) > 0 and a == pytest.approx(b, abs=1e-4)


@pytest.fixture(scope="module")
def inline(tiny_checkpoint: Path) -> LLM:
    return LLM(model=str(tiny_checkpoint), async_scheduling=False, output_thread=False,
               enable_prefix_caching=False)


def _stop_params(inline: LLM) -> list[SamplingParams]:
    """Per prompt, a stop string from the middle of its free greedy text (some sampled with
    n=2, some with logprobs, one keeping the stop string): the greedy ones end by it."""
    free = inline.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    params = []
    for i, o in enumerate(free):
        text = o.outputs[0].text
        assert len(text) > 20
        params.append(SamplingParams(
            temperature=0 if i % 2 else 0.9, seed=i, n=2 if i % 2 == 0 else 1,
            logprobs=1 if i < 3 else None, max_tokens=40, ignore_eos=True,
            stop=[text[10 + i:13 + i]], include_stop_str_in_output=i == 4))
    return params


def _slowed(llm: LLM, seconds: float) -> dict[str, int]:
    """Makes the output thread take `seconds` per step, so the engine runs ahead of it."""
    thread = llm.engine.output_thread
    assert thread is not None
    real = thread.processor.process
    seen = {"calls": 0, "off_loop": 0}

    def slow(records: Any) -> Any:
        seen["calls"] += 1
        seen["off_loop"] += threading.current_thread().name == "zayaserve-output"
        time.sleep(seconds)
        return real(records)

    thread.processor.process = slow  # type: ignore[method-assign]
    return seen


def test_stops_heard_late_cost_tokens_not_outputs(tiny_checkpoint: Path, inline: LLM) -> None:
    params = _stop_params(inline)
    expected = inline.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    threaded = LLM(model=str(tiny_checkpoint), enable_prefix_caching=False)
    seen = _slowed(threaded, 0.004)
    engine = threaded.engine
    computed: dict[tuple[str, int], int] = {}
    real_update = engine.scheduler.update_from_output

    def counting(*args: Any) -> Any:
        records = real_update(*args)
        for r in records:
            key = (r.seq.request.request_id, r.seq.index)
            computed[key] = computed.get(key, 0) + 1
        return records

    engine.scheduler.update_from_output = counting  # type: ignore[method-assign]
    got = threaded.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    _same(got, expected)
    # The greedy ones (odd i) end by their stop strings; the sampled ones may or may not.
    assert all(got[i].outputs[0].stop_reason == params[i].stop[0] for i in (1, 3, 5))
    assert seen["calls"] > 0 and seen["off_loop"] == seen["calls"]
    # The engine computed tokens past the stop strings before it heard of them...
    sent = sum(len(c.token_ids) for o in got for c in o.outputs)
    assert sum(computed.values()) > sent
    # ...and, having heard, finished every sequence and freed its blocks.
    assert not engine.requests and not engine.scheduler.running
    assert engine.scheduler.blocks.num_free == engine.cache.num_blocks


def test_async_engine_streams_from_the_output_thread(tiny_checkpoint: Path,
                                                     inline: LLM) -> None:
    params = _stop_params(inline)
    expected = inline.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    engine = LLM(model=str(tiny_checkpoint), enable_prefix_caching=False).engine
    assert engine.output_thread is not None
    async_engine = AsyncLLMEngine(engine)
    delivered_on: set[str] = set()
    real_sink = engine.output_thread.sink
    assert real_sink is not None

    def sink(deltas: Any) -> None:
        delivered_on.add(threading.current_thread().name)
        real_sink(deltas)

    engine.output_thread.sink = sink

    async def one(i: int) -> Any:
        builder = RequestOutputBuilder(f"q{i}", None)
        out = None
        async for delta in async_engine.generate(f"q{i}", PROMPTS[i], params[i]):
            out = builder.add(delta)
        return out

    async def main() -> list[Any]:
        return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))

    try:
        got = asyncio.run(main())
    finally:
        async_engine.shutdown()
    for o in got:
        o.request_id = ""
    for o in expected:
        o.request_id = ""
    _same(got, expected)
    assert delivered_on == {"zayaserve-output"}


def test_a_failure_in_the_output_thread_ends_only_its_requests(tiny_checkpoint: Path) -> None:
    llm = LLM(model=str(tiny_checkpoint), enable_prefix_caching=False)
    engine = llm.engine
    async_engine = AsyncLLMEngine(engine)
    thread = engine.output_thread
    assert thread is not None
    real = thread.processor.process

    def faulty(records: Any) -> Any:
        if any(r.seq.params.stop == ["boom"] for r in records):
            raise RuntimeError("injected output fault")
        return real(records)

    thread.processor.process = faulty  # type: ignore[method-assign]
    healthy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    async def run(label: str, params: SamplingParams) -> Any:
        tokens: list[int] = []
        try:
            async for delta in async_engine.generate(label, PROMPTS[0], params):
                tokens.extend(t for c in delta.completions for t in c.token_ids)
        except RequestFailedError as err:
            return err
        return tokens

    async def main() -> list[Any]:
        first = await run("ok-before", healthy)
        bad = await run("bad", SamplingParams(temperature=0, max_tokens=16, stop=["boom"]))
        after = await run("ok-after", healthy)
        assert not async_engine.is_dead and async_engine.failed_steps == 1
        return [first, bad, after]

    try:
        first, bad, after = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert isinstance(bad, RequestFailedError) and "RuntimeError" in str(bad)
    assert first == after and len(first) == 16
    assert engine.scheduler.blocks.num_free == engine.cache.num_blocks


def test_an_abort_drops_outputs_not_yet_taken(tiny_checkpoint: Path) -> None:
    llm = LLM(model=str(tiny_checkpoint), enable_prefix_caching=False)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("gone", PROMPTS[0], params)
    engine.add_request("kept", PROMPTS[1], params)
    thread = engine.output_thread
    assert thread is not None
    for _ in range(3):
        engine.step()
    thread.join()
    assert any(d.request_id == "gone" for d in thread._ready)  # made, not yet taken
    engine.abort_request("gone")
    ids: set[str] = set()
    while engine.has_unfinished_requests():
        ids |= {d.request_id for d in engine.step()}
    assert ids == {"kept"}
