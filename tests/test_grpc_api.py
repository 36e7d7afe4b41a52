"""The gRPC front end end to end: a real grpc.aio server (own thread and event loop) over
LocalEngineClient on the tiny checkpoint, driven through `zayaserve.client` (sync and asyncio) and
raw stubs. Outputs equal the offline `LLM`; health and reflection answer; bad fields are
INVALID_ARGUMENT naming them; overload is RESOURCE_EXHAUSTED; a cancelled call frees blocks."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from openai_helpers import ENGINE_KW, MODEL, free_port, make_engine_client

from zayaserve import LLM, SamplingParams
from zayaserve.client import AsyncZayaClient, ZayaClient
from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.grpc_server import start_grpc_server
from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc

PROMPTS = ["hello world", "the quick brown fox", "abc", "Zyphra"]
CHAT = [{"role": "user", "content": "hi there"}]


class GrpcServer:
    """start_grpc_server on a free port, served by an event loop on its own thread."""

    def __init__(self, engine_client: LocalEngineClient, **kw: Any) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._run(start_grpc_server(engine_client, self.port, "127.0.0.1", **kw))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        self._run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def wait_idle(engine_client: LocalEngineClient, timeout: float = 20.0) -> None:
    sched = engine_client.engine.engine.scheduler
    deadline = time.monotonic() + timeout
    while engine_client.engine.engine.has_unfinished_requests() or sched.running or (
            sched.blocks.num_free != sched.blocks.num_blocks):
        assert time.monotonic() < deadline, "requests still running / KV blocks not freed"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Any) -> LLM:
    return LLM(str(tiny_checkpoint), **ENGINE_KW)


@pytest.fixture(scope="module")
def server(engine_client: LocalEngineClient) -> Iterator[GrpcServer]:
    s = GrpcServer(engine_client)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: GrpcServer) -> Iterator[ZayaClient]:
    with ZayaClient(server.target, timeout=60) as c:
        yield c


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def test_unary_and_stream_equal_llm(client: ZayaClient, llm: LLM) -> None:
    refs = llm.generate(PROMPTS, greedy(max_tokens=6))
    for prompt, ref in zip(PROMPTS, refs, strict=True):
        out = ref.outputs[0]
        result = client.generate(prompt, max_tokens=6, temperature=0)
        assert result.model == MODEL and result.prompt_token_ids == ref.prompt_token_ids
        [completion] = result.completions
        assert completion.token_ids == out.token_ids and completion.text == out.text
        assert completion.finish_reason == "length"
        assert result.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert result.usage.completion_tokens == 6 and result.usage.total_tokens == (
            len(ref.prompt_token_ids) + 6)
        deltas = list(client.stream(prompt, max_tokens=6, temperature=0))
        assert [t for d in deltas for t in d.token_ids] == out.token_ids
        assert "".join(d.text for d in deltas) == out.text
        assert deltas[-1].finish_reason == "length" and deltas[-1].usage == result.usage
        assert all(d.usage is None and d.finish_reason is None for d in deltas[:-1])


def test_async_client_concurrent_token_ids_chat_n(server: GrpcServer, llm: LLM) -> None:
    ids = [[2, 75, 430], [2, 17, 42, 99], [2, 5]]
    refs = llm.generate([{"prompt_token_ids": p} for p in ids], greedy(max_tokens=5))
    chat_ref = llm.chat(CHAT, greedy(max_tokens=5))[0].outputs[0]
    seeded = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=5)
    n_ref = llm.generate("abc", seeded)[0]

    async def run() -> tuple[list[Any], list[Any], Any]:
        async with AsyncZayaClient(server.target, timeout=60) as c:
            assert await c.health()
            results = await asyncio.gather(
                *(c.generate(p, max_tokens=5, temperature=0) for p in ids),
                c.generate(messages=CHAT, max_tokens=5, temperature=0))
            chat_deltas = [d async for d in c.stream(messages=CHAT, max_tokens=5,
                                                     temperature=0)]
            n_result = await c.generate("abc", n=2, temperature=1.0, seed=11, max_tokens=5)
            return list(results), chat_deltas, n_result

    results, chat_deltas, n_result = asyncio.run(run())
    for result, ref in zip(results[:3], refs, strict=True):
        assert result.completions[0].token_ids == ref.outputs[0].token_ids
    assert results[3].completions[0].token_ids == chat_ref.token_ids
    assert results[3].text == chat_ref.text
    assert "".join(d.text for d in chat_deltas) == chat_ref.text
    assert [c.token_ids for c in n_result.completions] == [o.token_ids for o in n_ref.outputs]
    assert n_result.usage.completion_tokens == 10


def test_sampling_fields_and_logprobs(client: ZayaClient, llm: LLM) -> None:
    base = llm.generate("abc", greedy(max_tokens=8))[0].outputs[0]
    stop_id = base.token_ids[3]
    result = client.generate("abc", max_tokens=8, temperature=0, stop_token_ids=[stop_id])
    [c] = result.completions
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]
    stop = base.text[2:4]
    ref = llm.generate("abc", greedy(max_tokens=8, stop=stop))[0].outputs[0]
    streamed = list(client.stream("abc", max_tokens=8, temperature=0, stop=stop))
    assert "".join(d.text for d in streamed) == ref.text and stop not in ref.text
    assert streamed[-1].stop_reason == stop
    lp_ref = llm.generate("abc", greedy(max_tokens=3, logprobs=2))[0].outputs[0]
    with_lp = client.generate("abc", max_tokens=3, temperature=0, logprobs=2).completions[0]
    assert with_lp.logprobs is not None and len(with_lp.logprobs) == 3
    for pos, token_id, entries in zip(with_lp.logprobs, lp_ref.token_ids, lp_ref.logprobs,
                                      strict=True):
        assert pos.sampled.token_id == token_id
        assert pos.sampled.logprob == pytest.approx(entries[token_id].logprob, abs=1e-5)
        assert len(pos.top) == 2 and pos.top[0].rank == 1


def test_health_and_reflection(server: GrpcServer, client: ZayaClient) -> None:
    assert client.health() and client.health("zayaserve.v1.Generation")
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in reply.list_services_response.service}
    assert {"zayaserve.v1.Generation", "grpc.health.v1.Health"} <= names


BAD = [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=400), "max_tokens"),
    (dict(logprobs=99), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
]


@pytest.mark.parametrize(("sampling", "field"), BAD)
def test_invalid_sampling_fields(client: ZayaClient, sampling: dict[str, Any],
                                 field: str) -> None:
    for call in (lambda: client.generate("abc", **sampling),
                 lambda: list(client.stream("abc", **sampling))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert field in info.value.details()  # type: ignore[attr-defined]


def test_invalid_inputs_and_unknown_model(server: GrpcServer, client: ZayaClient) -> None:
    cases = [
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
        (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[2, 99999])),
         grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
        (pb.GenerateRequest(prompt_token_ids=pb.TokenIds()),
         grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
        (pb.GenerateRequest(prompt="x " * 300), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="robot")])),
         grpc.StatusCode.INVALID_ARGUMENT, "chat"),
        (pb.GenerateRequest(prompt="x", model="gpt-9"), grpc.StatusCode.NOT_FOUND, "model"),
    ]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for request, code, field in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.GenerateUnary(request, timeout=30)
            assert info.value.code() == code, request  # type: ignore[attr-defined]
            assert field in info.value.details()  # type: ignore[attr-defined]


def test_overload_is_resource_exhausted(tiny_checkpoint: Any) -> None:
    busy = make_engine_client(str(tiny_checkpoint), max_pending_requests=1)
    server = GrpcServer(busy)

    async def fire() -> list[Any]:
        async with AsyncZayaClient(server.target, timeout=60) as c:
            return await asyncio.gather(
                *(c.generate(p, max_tokens=16, temperature=0) for p in PROMPTS),
                return_exceptions=True)

    try:
        results = asyncio.run(fire())
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors and len(errors) < len(results), results
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
        wait_idle(busy)
    finally:
        server.stop()
        busy.engine.shutdown()


def test_cancel_frees_blocks(client: ZayaClient, engine_client: LocalEngineClient) -> None:
    wait_idle(engine_client)
    steps_before = engine_client.engine.steps
    stream = client.stream("hello", max_tokens=200, temperature=0, ignore_eos=True)
    got = [next(stream), next(stream)]
    assert len(got) == 2 and engine_client.engine.num_pending == 1
    stream.close()  # leaving the iterator cancels the call
    wait_idle(engine_client)
    assert engine_client.engine.steps - steps_before < 150
    assert engine_client.engine.num_pending == 0


def test_async_cancel_frees_blocks(server: GrpcServer, engine_client: LocalEngineClient) -> None:
    wait_idle(engine_client)
    steps_before = engine_client.engine.steps

    async def run() -> None:
        async with AsyncZayaClient(server.target, timeout=60) as c:
            stream = c.stream("hello", max_tokens=200, temperature=0, ignore_eos=True)
            await stream.__anext__()
            await stream.__anext__()
            await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(run())
    wait_idle(engine_client)
    assert engine_client.engine.steps - steps_before < 150


def test_api_key(engine_client: LocalEngineClient) -> None:
    server = GrpcServer(engine_client, api_key="sekret")
    try:
        with ZayaClient(server.target, timeout=30) as anonymous:
            with pytest.raises(grpc.RpcError) as info:
                anonymous.generate("abc", max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            assert anonymous.health()  # probes need no key
        with ZayaClient(server.target, api_key="sekret", timeout=30) as keyed:
            assert keyed.generate("abc", max_tokens=2).usage.completion_tokens == 2
    finally:
        server.stop()


def test_structured_outputs(client: ZayaClient) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    result = client.generate("abc", max_tokens=40, seed=1, structured_outputs={
        "json": schema, "disable_any_whitespace": True})
    assert json.loads(result.completions[0].text) in ({"ok": True}, {"ok": False})
    streamed = client.stream("abc", max_tokens=20, structured_outputs={"choice": ["yes", "no"]})
    assert "".join(d.text for d in streamed) in ("yes", "no")
    with pytest.raises(grpc.RpcError) as info:
        client.generate("abc", max_tokens=4, structured_outputs={"regex": "(unclosed"})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "structured_outputs.regex" in info.value.details()  # type: ignore[attr-defined]
