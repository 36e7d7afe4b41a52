"""No cancellation or fault kills the async engine's loop: a request cancelled while queued
behind a slow step, a failing step (only its requests fail), repeated failures (the engine is
marked dead), peer faults (503s, never a dead engine), and a reader that stops reading (aborted,
its blocks freed). Each case ends with a normal request giving the offline `LLM`'s tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai_helpers import (
    ENGINE_KW,
    MODEL,
    Server,
)
from test_robustness import PROBE, PROBE_TOKENS, probe

from zayaserve import LLM, SamplingParams
from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.openai_api import build_openai_app
from zayaserve.replicas.engine.async_engine import (
    AsyncLLMEngine,
    RequestFailedError,
    StreamStalledError,
)
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.engine.outputs import RequestOutputBuilder


@pytest.fixture()
def engine(tiny_checkpoint: Any) -> Iterator[AsyncLLMEngine]:
    eng = AsyncLLMEngine(LLMEngine(EngineConfig(model=str(tiny_checkpoint), **ENGINE_KW)),
                         max_unread_steps=8)
    yield eng
    eng.shutdown()


def _greedy_ids(eng: AsyncLLMEngine, prompt: list[int], n: int = PROBE_TOKENS) -> list[int]:
    async def run() -> list[int]:
        builder = RequestOutputBuilder("probe", None)
        async for delta in eng.generate("probe", prompt, SamplingParams(
                temperature=0, max_tokens=n, ignore_eos=True)):
            builder.add(delta)
        assert builder.output.finished
        return builder.output.outputs[0].token_ids

    return asyncio.run(run())


def _offline_ids(tiny_checkpoint: Any, prompt: list[int], n: int = PROBE_TOKENS) -> list[int]:
    llm = LLM(str(tiny_checkpoint), **ENGINE_KW)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True))
    return out[0].outputs[0].token_ids


def _idle(eng: AsyncLLMEngine, timeout: float = 20) -> bool:
    s = eng.engine.scheduler
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (not eng.engine.requests and not s.running and not s.waiting
                and s.blocks.num_free == s.blocks.num_blocks and eng.num_pending == 0):
            return True
        time.sleep(0.02)
    return False


def test_cancel_while_queued_behind_a_slow_step(engine: AsyncLLMEngine, tiny_checkpoint: Any):
    """Requests cancelled while their add waits behind a slow step (a gRPC deadline shorter
    than a step) neither kill the loop nor leak; the request queued behind them completes."""
    real_step = engine.engine.step

    def slow_step() -> Any:
        time.sleep(0.2)
        return real_step()

    engine.engine.step = slow_step  # type: ignore[method-assign]
    prompt = [2, 40, 41, 42]

    async def main() -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        busy = asyncio.ensure_future(_drain(engine.generate("busy", [2, 7, 8], params)))
        await asyncio.sleep(0.05)  # the loop is now inside a slow step
        for i in range(5):  # cancelled before, while and after their add is taken
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(_drain(engine.generate(f"c{i}", prompt, params)),
                                       timeout=0.02 + 0.1 * i)
        innocent = await _drain(engine.generate("innocent", prompt, SamplingParams(
            temperature=0, max_tokens=PROBE_TOKENS, ignore_eos=True)))
        await busy
        return innocent

    ids = asyncio.run(main())
    engine.engine.step = real_step  # type: ignore[method-assign]
    assert not engine.is_dead
    assert ids == _offline_ids(tiny_checkpoint, prompt)
    assert _idle(engine)


async def _drain(stream: Any) -> list[int]:
    ids: list[int] = []
    async for delta in stream:
        ids.extend(t for c in delta.completions for t in c.token_ids)
    return ids


def test_a_failing_step_fails_its_requests_only(engine: AsyncLLMEngine, tiny_checkpoint: Any):
    runner = engine.engine.runner
    real_run = runner.execute
    failures = {"left": 1}

    def flaky_run(*args: Any, **kw: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected fault")
        return real_run(*args, **kw)

    runner.execute = flaky_run  # type: ignore[method-assign]
    with pytest.raises(RequestFailedError, match="RuntimeError") as info:
        _greedy_ids(engine, [2, 40, 41, 42])
    assert info.value.cause == "RuntimeError" and not info.value.retryable
    assert not engine.is_dead and engine.failed_steps == 1
    assert _greedy_ids(engine, [2, 40, 41, 42]) == _offline_ids(tiny_checkpoint, [2, 40, 41, 42])
    assert _idle(engine)


def test_repeated_step_failures_mark_the_engine_dead(engine: AsyncLLMEngine):
    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("always broken")

    engine.engine.runner.execute = broken  # type: ignore[method-assign]
    for _ in range(engine.max_consecutive_step_failures):
        with pytest.raises(RequestFailedError):
            _greedy_ids(engine, [2, 9, 10])
    assert engine.is_dead
    engine_client = LocalEngineClient(engine, MODEL)
    server = Server(build_openai_app(engine_client, served_model_names=[MODEL]))
    try:
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503 and "Traceback" not in health.text
        r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers.get("retry-after") == "1"
        assert r.json()["error"]["type"] == "server_error" and "Traceback" not in r.text
    finally:
        server.stop()


def test_peer_faults_fail_requests_with_503_but_never_kill(engine: AsyncLLMEngine,
                                                           tiny_checkpoint: Any):
    """An expert backend that keeps failing (shards away) fails each step's requests as
    retryable, however often; once it is back, answers are exact again."""

    class ShardsAway(RuntimeError):
        retryable = True

    runner = engine.engine.runner
    real_run = runner.execute
    away = {"on": True}

    def run(*args: Any, **kw: Any) -> Any:
        if away["on"]:
            raise ShardsAway("no live replica for experts [0]")
        return real_run(*args, **kw)

    runner.execute = run  # type: ignore[method-assign]
    engine_client = LocalEngineClient(engine, MODEL)
    server = Server(build_openai_app(engine_client, served_model_names=[MODEL]))
    try:
        for _ in range(engine.max_consecutive_step_failures + 2):
            r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                           json={"model": MODEL, "prompt": PROBE, "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.headers.get("retry-after") == "1"
            assert "ShardsAway" in r.json()["error"]["message"] and "Traceback" not in r.text
        assert not engine.is_dead
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        away["on"] = False
        text = probe(server)
    finally:
        server.stop()
    llm = LLM(str(tiny_checkpoint), **ENGINE_KW)
    want = llm.generate([PROBE], SamplingParams(temperature=0, max_tokens=PROBE_TOKENS,
                                                ignore_eos=True))[0].outputs[0].text
    assert text == want


def test_a_reader_that_stops_reading_is_aborted(engine: AsyncLLMEngine):
    async def main() -> None:
        stream = engine.generate("slow-reader", [2, 5, 6], SamplingParams(
            temperature=0, max_tokens=200, ignore_eos=True))
        first = await stream.__anext__()
        assert not first.finished
        await asyncio.sleep(3)  # far more than max_unread_steps (8) steps
        # The request is gone from the engine while the reader slept, blocks and all.
        assert not engine.engine.requests
        with pytest.raises(StreamStalledError, match="max_unread_steps"):
            while True:
                await stream.__anext__()

    asyncio.run(main())
    assert _idle(engine)
