"""No request, cancellation or fault kills a replica: each killer request gets its own 4xx (or
is cancelled, or fails alone), and a normal request right after it gets exactly the offline
`LLM`'s greedy text. Real engine, real uvicorn, real HTTP and gRPC (the engine loop's own
faults: test_engine_loop_faults.py)."""

from __future__ import annotations

import threading
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
