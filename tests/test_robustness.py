"""No request, cancellation or fault kills a replica: each killer request gets its own 4xx (or
is cancelled, or fails alone), and a normal request right after it gets exactly the offline
`LLM`'s greedy text. Real engine, real uvicorn, real HTTP and gRPC."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from openai_helpers import (
    ENGINE_KW,
    MODEL,
    Server,
    make_engine_client,
    wait_idle,
)
from test_grpc_api import GrpcServer

from zayaserve import LLM, SamplingParams
from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.openai_api import build_openai_app
from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc
from zayaserve.replicas.engine.async_engine import (
    AsyncLLMEngine,
    RequestFailedError,
    StreamStalledError,
)
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.engine.outputs import RequestOutputBuilder

PROBE = "The capital of"
PROBE_TOKENS = 8


@pytest.fixture(scope="module")
def expected(tiny_checkpoint: Any) -> str:
    """The offline engine's greedy text for the probe: what every replica must still answer."""
    llm = LLM(str(tiny_checkpoint), **ENGINE_KW)
    out = llm.generate([PROBE], SamplingParams(temperature=0, max_tokens=PROBE_TOKENS,
                                               ignore_eos=True))
    return out[0].outputs[0].text


@pytest.fixture(scope="module")
def engine_client(tiny_checkpoint: Any) -> Iterator[LocalEngineClient]:
    client = make_engine_client(str(tiny_checkpoint))
    yield client
    client.engine.shutdown()


@pytest.fixture(scope="module")
def server(engine_client: LocalEngineClient) -> Iterator[Server]:
    s = Server(build_openai_app(engine_client, served_model_names=[MODEL]))
    yield s
    s.stop()


def probe(server: Server) -> str:
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": PROBE, "max_tokens": PROBE_TOKENS, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def post_raw(server: Server, body: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", content=body, timeout=60,
                      headers={"content-type": "application/json"})


KILLERS = {
    "infinite temperature with min_tokens": (
        '{"model": "%s", "prompt": "hi", "temperature": 1e999, "min_tokens": 3}', "temperature"),
    "Infinity temperature": (
        '{"model": "%s", "prompt": "hi", "temperature": Infinity, "min_tokens": 3}',
        "temperature"),
    "huge finite temperature": (
        '{"model": "%s", "prompt": "hi", "temperature": 1e300, "min_tokens": 3}', "temperature"),
    "n of 100000": ('{"model": "%s", "prompt": "hi", "n": 100000}', "n"),
    "stop ids banning the whole vocabulary": (
        '{"model": "%s", "prompt": "hi", "min_tokens": 2, "stop_token_ids": '
        + str(list(range(512))) + "}", "stop_token_ids"),
    "stop ids outside the vocabulary": (
        '{"model": "%s", "prompt": "hi", "stop_token_ids": [999999]}', "stop_token_ids"),
    "10^5 stop strings": (
        '{"model": "%s", "prompt": "hi", "stop": ' + str([f"s{i}" for i in range(10**5)])
        .replace("'", '"') + "}", "stop"),
    "a stop string of 10^4 characters": (
        '{"model": "%s", "prompt": "hi", "stop": ["' + "x" * 10**4 + '"]}', "stop"),
    "too many prompts": ('{"model": "%s", "prompt": ' + str(["p"] * 65).replace("'", '"')
                         + "}", "prompt"),
    "empty prompt list": ('{"model": "%s", "prompt": []}', "prompt"),
    "NaN top_p": ('{"model": "%s", "prompt": "hi", "top_p": NaN}', "top_p"),
}


@pytest.mark.parametrize("name", sorted(KILLERS))
def test_killer_request_gets_4xx_and_replica_lives(name: str, server: Server,
                                                   engine_client: LocalEngineClient, expected: str):
    body, field = KILLERS[name]
    r = post_raw(server, body % MODEL)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert field in error["message"] and "Traceback" not in r.text
    assert not engine_client.engine.is_dead
    assert probe(server) == expected
    wait_idle(engine_client)


@pytest.fixture(scope="module")
def grpc_stub(engine_client: LocalEngineClient) -> Iterator[Any]:
    server = GrpcServer(engine_client, max_message_bytes=2**20)
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationStub(channel)
    server.stop()


def _grpc_text(stub: Any, prompt: str, **sampling: Any) -> str:
    reply = stub.GenerateUnary(pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
        **sampling)), timeout=60)
    return str(reply.outputs[0].text)


GRPC_KILLERS = {
    "infinite temperature": (dict(temperature=float("inf"), min_tokens=3),
                             "sampling.temperature"),
    "n of 100000": (dict(n=100000), "sampling.n"),
    "stop ids banning the whole vocabulary": (
        dict(min_tokens=2, stop_token_ids=list(range(512))), "sampling.stop_token_ids"),
    "10^5 stop strings": (dict(stop=[f"s{i}" for i in range(10**5)]), "sampling.stop"),
}


@pytest.mark.parametrize("name", sorted(GRPC_KILLERS))
def test_grpc_killer_gets_invalid_argument(name: str, grpc_stub: Any, expected: str):
    sampling, field = GRPC_KILLERS[name]
    with pytest.raises(grpc.RpcError) as info:
        _grpc_text(grpc_stub, "hi", **sampling)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")
    assert _grpc_text(grpc_stub, PROBE, temperature=0, max_tokens=PROBE_TOKENS,
                      ignore_eos=True) == expected


def test_grpc_oversized_message_and_short_deadlines(
        grpc_stub: Any, engine_client: LocalEngineClient, expected: str):
    with pytest.raises(grpc.RpcError) as info:
        _grpc_text(grpc_stub, "x" * 2**21)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for timeout in (0.001, 0.005, 0.02, 0.05):  # deadlines shorter than a step
        with pytest.raises(grpc.RpcError) as info:
            grpc_stub.GenerateUnary(pb.GenerateRequest(
                prompt=PROBE, sampling=pb.SamplingParams(max_tokens=50)), timeout=timeout)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not engine_client.engine.is_dead
    assert _grpc_text(grpc_stub, PROBE, temperature=0, max_tokens=PROBE_TOKENS,
                      ignore_eos=True) == expected
    wait_idle(engine_client)


def test_reused_request_ids_never_cross_streams(
        tiny_checkpoint: Any, engine_client: LocalEngineClient, grpc_stub: Any):
    """Two gRPC clients pick the same request_id at once: each gets its own prompt's tokens."""
    prompts = ["Once upon a time", "1 2 3 4"]
    llm = LLM(str(tiny_checkpoint), **ENGINE_KW)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    def run(prompt: str) -> list[int]:
        ids: list[int] = []
        request = pb.GenerateRequest(prompt=prompt, request_id="same-id", sampling=pb.
                                     SamplingParams(temperature=0, max_tokens=24,
                                                    ignore_eos=True))
        for message in grpc_stub.Generate(request, timeout=60):
            assert message.request_id == "same-id"  # the client's label comes back
            for c in message.outputs:
                ids.extend(c.token_ids)
        return ids

    results: list[list[int]] = [[], []]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(prompts[i])))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert results == want
    wait_idle(engine_client)


# ---- the engine loop: cancellation, step failures, stalled readers ------------------------


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
