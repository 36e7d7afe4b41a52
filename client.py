"""Python client of zayaserve's gRPC API (`zayaserve.v1.Generation`), sync and asyncio.

    from zayaserve.client import ZayaClient

    with ZayaClient("localhost:50051") as client:
        result = client.generate("Hello", max_tokens=16, temperature=0)
        print(result.completions[0].text, result.usage)
        for delta in client.stream([2, 17, 42], max_tokens=8):  # token ids work too
            print(delta.index, delta.text, end="")

Sampling keywords are vLLM's `SamplingParams` fields (n, temperature, top_p, top_k, seed, stop,
stop_token_ids, ignore_eos, max_tokens, min_tokens, logprobs, skip_special_tokens,
include_stop_str_in_output); the server validates them. `rsa={...}` (RSAParams' fields) asks
for a Markovian RSA run instead; its rounds come back as `result.rsa`. Errors are
`grpc.RpcError`s whose `code()` is INVALID_ARGUMENT (bad field, named in `details()`),
RESOURCE_EXHAUSTED (overload), NOT_FOUND (unknown model), UNAUTHENTICATED (API key).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc

Prompt = str | Sequence[int]

_SCALAR_FIELDS = frozenset({
    "n", "temperature", "top_p", "top_k", "seed", "ignore_eos", "max_tokens", "min_tokens",
    "logprobs", "skip_special_tokens", "include_stop_str_in_output"})


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int
    token: str


@dataclass(frozen=True, slots=True)
class PositionLogprobs:
    sampled: TokenLogprob
    top: list[TokenLogprob]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class Delta:
    """New output of one completion (`index` of n). `usage` is set on the request's last."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None
    stop_reason: str | int | None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None
    stop_reason: str | int | None


@dataclass(frozen=True, slots=True)
class GenerateResult:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    usage: Usage
    rsa: dict[str, Any] | None = None  # an RSA run's rounds (RSAInfo as a dict)

    @property
    def text(self) -> str:
        """The first completion's text (the only one unless n > 1)."""
        return self.completions[0].text


def build_request(
    prompt: Prompt | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
    model: str = "", request_id: str = "", rsa: Mapping[str, Any] | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """The request message: exactly one of prompt (text or token ids) and messages (chat).
    `rsa` (RSAParams' fields as a dict) asks for a Markovian RSA run instead of sampling."""
    if (prompt is None) == (messages is None):
        raise TypeError("pass exactly one of prompt (text or token ids) and messages")
    request = pb.GenerateRequest(model=model, request_id=request_id)
    if rsa is not None:
        json_format.ParseDict(dict(rsa), request.rsa)
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.prompt_token_ids.ids.extend(prompt)
    else:
        assert messages is not None
        request.chat.messages.extend(
            pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "stop":
            request.sampling.stop.extend([value] if isinstance(value, str) else value)
        elif name == "stop_token_ids":
            request.sampling.stop_token_ids.extend(value)
        elif name == "structured_outputs":
            request.sampling.structured_outputs.CopyFrom(_structured_pb(value))
        elif name in _SCALAR_FIELDS:
            setattr(request.sampling, name, value)
        else:
            raise TypeError(f"{name}: not a sampling parameter")
    return request


def _structured_pb(spec: Mapping[str, Any]) -> pb.StructuredOutputs:
    """vLLM's structured_outputs dict, e.g. {"json": schema} or {"choice": ["a", "b"]}."""
    out = pb.StructuredOutputs()
    for kind, value in spec.items():
        if kind == "json":
            out.json = value if isinstance(value, str) else json.dumps(value)
        elif kind == "choice":
            out.choice.choices.extend(value)
        elif kind in ("regex", "grammar", "json_object", "disable_any_whitespace"):
            setattr(out, kind, value)
        else:
            raise TypeError(f"structured_outputs.{kind}: not a structured-outputs field")
    return out


def _logprobs(delta: pb.CompletionDelta) -> list[PositionLogprobs] | None:
    if not delta.logprobs:
        return None

    def one(t: pb.TokenLogprob) -> TokenLogprob:
        return TokenLogprob(t.token_id, t.logprob, t.rank, t.token)

    return [PositionLogprobs(one(p.sampled), [one(t) for t in p.top]) for p in delta.logprobs]


def _stop_reason(delta: pb.CompletionDelta) -> str | int | None:
    which = delta.WhichOneof("stop_reason")
    return None if which is None else getattr(delta, which)  # type: ignore[no-any-return]


def _usage(message: pb.GenerateResponse) -> Usage | None:
    if not message.HasField("usage"):
        return None
    u = message.usage
    return Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens)


def _deltas(message: pb.GenerateResponse) -> Iterator[Delta]:
    usage = _usage(message) if message.finished else None
    last = len(message.outputs) - 1
    for i, d in enumerate(message.outputs):
        yield Delta(d.index, d.text, list(d.token_ids), _logprobs(d), d.finish_reason or None,
                    _stop_reason(d), usage if i == last else None)


def _result(message: pb.GenerateResponse) -> GenerateResult:
    completions = [Completion(d.index, d.text, list(d.token_ids), _logprobs(d),
                              d.finish_reason or None, _stop_reason(d))
                   for d in message.outputs]
    usage = _usage(message) or Usage(0, 0, 0)
    rsa = _rsa_info(message.rsa) if message.HasField("rsa") else None
    return GenerateResult(message.request_id, message.model, list(message.prompt_token_ids),
                          completions, usage, rsa)


def _rsa_info(info: pb.RSAInfo) -> dict[str, Any]:
    """RSAInfo as the REST response's `rsa` block."""
    rounds = [{f: getattr(r, f) for f in ("round", "calls", "prompt_tokens", "cached_tokens",
                                          "completion_tokens", "max_context")}
              for r in info.rounds]
    out: dict[str, Any] = {f: getattr(info, f) for f in (
        "n", "k", "t", "tail_tokens", "calls", "max_context", "max_context_bound")}
    out.update(seed=info.seed if info.HasField("seed") else None, rounds=rounds,
               population=[list(p.traces) for p in info.population] or None)
    return out


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class ZayaClient:
    """Blocking client; `target` is "host:port". Use as a context manager or call close()."""

    def __init__(self, target: str, *, api_key: str | None = None,
                 timeout: float | None = None) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = _metadata(api_key)
        self.timeout = timeout

    def generate(self, prompt: Prompt | None = None, **kwargs: Any) -> GenerateResult:
        """Whole result; kwargs: messages, model, request_id and sampling fields."""
        request = build_request(prompt, **kwargs)
        reply = self._stub.GenerateUnary(request, timeout=self.timeout, metadata=self._metadata)
        return _result(reply)

    def stream(self, prompt: Prompt | None = None, **kwargs: Any) -> Iterator[Delta]:
        """Deltas as they are generated. Stopping early (break, close) cancels the request."""
        call = self._stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout,
                                   metadata=self._metadata)
        try:
            for message in call:
                yield from _deltas(message)
        finally:
            call.cancel()  # no-op once the call has completed

    def health(self, service: str = "") -> bool:
        """True when the server reports SERVING for `service` ("" is the whole server)."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                   timeout=self.timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ZayaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncZayaClient:
    """asyncio client (grpc.aio); create and use it inside one event loop."""

    def __init__(self, target: str, *, api_key: str | None = None,
                 timeout: float | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = _metadata(api_key)
        self.timeout = timeout

    async def generate(self, prompt: Prompt | None = None, **kwargs: Any) -> GenerateResult:
        request = build_request(prompt, **kwargs)
        reply = await self._stub.GenerateUnary(request, timeout=self.timeout,
                                               metadata=self._metadata)
        return _result(reply)

    async def stream(self, prompt: Prompt | None = None, **kwargs: Any) -> AsyncIterator[Delta]:
        call = self._stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout,
                                   metadata=self._metadata)
        try:
            async for message in call:
                for delta in _deltas(message):
                    yield delta
        finally:
            call.cancel()

    async def health(self, service: str = "") -> bool:
        reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                         timeout=self.timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncZayaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
