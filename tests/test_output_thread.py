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
    threaded = LLM(model=str(tiny_checkpoint), enable_prefix_caching=False, output_thread=True)
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
    engine = LLM(model=str(tiny_checkpoint), enable_prefix_caching=False,
                 output_thread=True).engine
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
    llm = LLM(model=str(tiny_checkpoint), enable_prefix_caching=False, output_thread=True)
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
    llm = LLM(model=str(tiny_checkpoint), enable_prefix_caching=False, output_thread=True)
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


def _reference(tok: Any, prompt: list[int], tokens: list[int], params: SamplingParams
               ) -> tuple[str, str, Any, int]:
    """Stop strings searched in the whole text, token by token (the engine's rule before the
    output processor kept only a window): text, finish reason, stop reason, tokens taken."""
    from zayaserve.replicas.model.tokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True)
    text = ""
    for i, t in enumerate(tokens):
        delta = detok.add(t)
        text += delta
        for stop in params.stop or () if delta else ():
            at = text.find(stop, max(0, len(text) - len(delta) - len(stop) + 1))
            if at >= 0:
                end = at + len(stop) if params.include_stop_str_in_output else at
                return text[:end], "stop", stop, i + 1
    return text + detok.flush(), "length", None, len(tokens)


@pytest.mark.parametrize("kind", ["bytelevel", "gemma", "special"])
def test_stop_strings_cut_like_a_whole_text_search(kind: str) -> None:
    """A property, over many seeds and every tokenizer kind: the output processor's deltas,
    joined, are the whole-text rule's output (stop strings of 1-8 characters, one or several,
    kept or not, cut across any number of deltas), and no delta is ever taken back."""
    import random

    import tokenizer_kinds

    from zayaserve.replicas.engine.output_processor import OutputProcessor, TokenRecord
    from zayaserve.replicas.engine.sequence import Request, Sequence

    tok = tokenizer_kinds.load(kind)
    specials = set(tok.all_special_ids)
    vocab = [i for i in range(tok.vocab_size) if i not in specials]
    stopped = 0
    for seed in range(60):
        rng = random.Random(seed)
        prompt = [rng.choice(vocab) for _ in range(4)]
        tokens = [rng.choice(vocab) for _ in range(rng.randint(5, 40))]
        free, _, _, _ = _reference(tok, prompt, tokens, SamplingParams(max_tokens=1))
        stops = []
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(1, 8)
            at = rng.randrange(max(1, len(free) - n + 1))
            stops.append(free[at:at + n] or "x")
        if rng.random() < 0.2:
            stops = ["\u0000never"]
        params = SamplingParams(max_tokens=len(tokens), stop=stops,
                                include_stop_str_in_output=rng.random() < 0.3)
        want = _reference(tok, prompt, tokens, params)
        processor = OutputProcessor(tok)
        req = Request(f"p{seed}", None, prompt, params, 0)
        seq = Sequence(0, req, 0, list(prompt), seed)
        req.seqs.append(seq)
        text, reason, stop_reason, taken = "", None, None, 0
        for i, t in enumerate(tokens):
            last = i == len(tokens) - 1
            deltas = processor.process([TokenRecord(
                seq, t, None, 0.0, "length" if last else None, None, False)])
            for d in deltas:
                (c,) = d.completions
                text += c.text
                taken += len(c.token_ids)
                reason, stop_reason = c.finish_reason, c.stop_reason
            if reason is not None:
                break
        assert (text, reason, stop_reason, taken) == want, (kind, seed, stops)
        stopped += reason == "stop"
    assert stopped >= 30  # most cases really end by a stop string
