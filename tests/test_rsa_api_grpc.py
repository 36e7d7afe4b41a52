"""Markovian RSA over gRPC (unary and streaming, against REST's answer), through the Python
`ZayaClient`, and gRPC's refusals of bad RSA fields."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from openai_helpers import Server
from rsa_api_helpers import (
    LIMITS,
    PROBLEM,
    RSA,
    _chat,
    engine_client,  # noqa: F401 (fixture)
    server,  # noqa: F401 (fixture)
)
from test_grpc_api import GrpcServer

from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def stub(engine_client: LocalEngineClient) -> Iterator[Any]:  # noqa: F811
    server = GrpcServer(engine_client, rsa_limits=LIMITS)  # noqa: F811
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationStub(channel)
    server.stop()


def _grpc_request(salt: str, **rsa: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=PROBLEM)]),
        cache_salt=salt, rsa=pb.RSAParams(**{**RSA, **rsa}))


def test_grpc_matches_rest(stub: Any, server: Server) -> None:  # noqa: F811
    rest = _chat(server, "grpc-rest", rsa=RSA).json()
    unary = stub.GenerateUnary(_grpc_request("grpc-unary"), timeout=120)
    assert unary.outputs[0].text == rest["choices"][0]["message"]["content"]
    assert [r.calls for r in unary.rsa.rounds] == [4, 4, 1]
    assert unary.usage.prompt_tokens == rest["usage"]["prompt_tokens"]
    assert unary.usage.cached_tokens == rest["usage"]["prompt_tokens_details"]["cached_tokens"]
    messages = list(stub.Generate(_grpc_request("grpc-stream"), timeout=120))
    progress = [m.rsa_progress.calls_done for m in messages if m.HasField("rsa_progress")]
    assert progress[-1] == 9
    assert "".join(o.text for m in messages for o in m.outputs) == unary.outputs[0].text
    assert messages[-1].finished and messages[-1].rsa.calls == 9


def test_python_grpc_client(engine_client: LocalEngineClient) -> None:  # noqa: F811
    from zayaserve.client import ZayaClient

    server = GrpcServer(engine_client, rsa_limits=LIMITS)  # noqa: F811
    try:
        with ZayaClient(server.target) as client:
            result = client.generate(messages=[{"role": "user", "content": PROBLEM}],
                                     rsa={**RSA, "final_sampling": {"top_k": 5}})
    finally:
        server.stop()
    assert result.rsa is not None and [r["calls"] for r in result.rsa["rounds"]] == [4, 4, 1]
    assert result.usage.prompt_tokens == sum(r["prompt_tokens"] for r in result.rsa["rounds"])
    assert result.rsa["seed"] == RSA["seed"] and result.rsa["population"] is None


@pytest.mark.parametrize(("request_fields", "param"), [
    (dict(rsa=pb.RSAParams(n=0)), "rsa.n"),
    (dict(rsa=pb.RSAParams(**{**RSA, "tail_tokens": 4000})), "rsa.tail_tokens"),
    (dict(rsa=pb.RSAParams(final_sampling=pb.RSAFinalSampling(top_p=2.0))),
     "rsa.final_sampling.top_p"),
    (dict(rsa=pb.RSAParams(n=2), sampling=pb.SamplingParams(temperature=0.5)), "sampling"),
])
def test_grpc_bad_fields(stub: Any, request_fields: dict[str, Any], param: str) -> None:
    request = pb.GenerateRequest(prompt=PROBLEM, **request_fields)
    with pytest.raises(grpc.RpcError) as caught:
        stub.GenerateUnary(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(param)
