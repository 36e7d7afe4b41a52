"""Abuse tests of tracing and logging: a caller without a key leaves no span; a client's sampled
`traceparent` does not force a trace unless `tracing.trust_client_sampling` is on (it still
joins the client's trace when the server samples it); client text in span names, attributes
and log lines is bounded and escaped."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from test_grpc_api import GrpcServer, wait_idle

from zayaserve.cluster.frontend import grpc_api
from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc
from zayaserve.replicas.observability import tracing
from zayaserve.replicas.observability.safe_text import MAX_TRACE_CHARS, cap, log_safe
from zayaserve.replicas.observability.tracing import TracingConfig

KEY = "hardening-key-0123"
AUTH = (("authorization", f"Bearer {KEY}"),)
REQUEST = pb.GenerateRequest(prompt="hello world", sampling=pb.SamplingParams(
    max_tokens=2, temperature=0, ignore_eos=True))


def _configure(exporter: InMemorySpanExporter, **fields: Any) -> None:
    tracing.configure(TracingConfig(otlp_traces_endpoint="http://unused:4317", **fields),
                      "test", exporter=exporter)


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    _configure(exporter, sampler="always_on")
    yield exporter
    tracing.shutdown()


@pytest.fixture(scope="module")
def stub(engine_client: Any) -> Iterator[Any]:
    server = GrpcServer(engine_client, api_keys=[KEY])
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationStub(channel)
    server.stop()


def _servers(exporter: InMemorySpanExporter) -> list[Any]:
    """The ingress spans exported so far."""
    tracing.flush()
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


def _traceparent(sampled: bool = True) -> tuple[str, int, int]:
    trace_id, span_id = secrets.randbits(128) | 1, secrets.randbits(64) | 1
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}", trace_id, span_id


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-key-0000"),)])
def test_a_caller_not_let_in_leaves_no_span(stub: Any, exported: InMemorySpanExporter,
                                            metadata: tuple[tuple[str, str], ...]) -> None:
    header, _, _ = _traceparent()
    forced = (*metadata, ("traceparent", header))
    huge = pb.GenerateRequest(model="m" * 1_000_000, prompt="x")
    for call in (lambda r: stub.GenerateUnary(r, metadata=forced, timeout=30),
                 lambda r: list(stub.Generate(r, metadata=forced, timeout=30))):
        for request in (REQUEST, huge):
            with pytest.raises(grpc.RpcError) as caught:
                call(request)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    tracing.flush()
    assert exported.get_finished_spans() == ()
    # The same call with the key is traced: the check above is not vacuous.
    stub.GenerateUnary(REQUEST, metadata=AUTH, timeout=60)
    assert len(_servers(exported)) == 1


def test_client_text_in_a_span_is_capped(stub: Any, exported: InMemorySpanExporter) -> None:
    request = pb.GenerateRequest(model="m" * 1_000_000, request_id="r" * 100_000, prompt="x")
    with pytest.raises(grpc.RpcError) as caught:
        stub.GenerateUnary(request, metadata=AUTH, timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    [span] = _servers(exported)
    assert len(span.name) <= MAX_TRACE_CHARS
    assert span.attributes["gen_ai.request.model"] == cap("m" * 1_000_000)
    assert all(len(v) <= MAX_TRACE_CHARS for v in span.attributes.values()
               if isinstance(v, str))


def test_every_span_name_and_attribute_is_capped(exported: InMemorySpanExporter) -> None:
    tracer = tracing.tracer()
    assert tracer is not None
    span = tracer.start_span("n" * 10_000, attributes={"a": "v" * 10_000, "b": ["w" * 10_000]})
    span.set_attribute("c", "x" * 10_000)
    span.end()
    tracing.flush()
    [got] = exported.get_finished_spans()
    assert len(got.name) == MAX_TRACE_CHARS and got.name.endswith("…")
    assert {k: len(v if isinstance(v, str) else v[0]) for k, v in got.attributes.items()} == {
        "a": MAX_TRACE_CHARS, "b": MAX_TRACE_CHARS, "c": MAX_TRACE_CHARS}


@pytest.mark.parametrize("trust", [False, True])
def test_a_forced_traceparent_is_honoured_only_when_trusted(
        stub: Any, engine_client: Any, trust: bool) -> None:
    exporter = InMemorySpanExporter()
    _configure(exporter, sampler="parentbased_traceidratio", sampler_arg=0.0,
               trust_client_sampling=trust)
    try:
        header, trace_id, span_id = _traceparent()
        stub.GenerateUnary(REQUEST, metadata=(*AUTH, ("traceparent", header)), timeout=60)
        wait_idle(engine_client)
        spans = _servers(exporter)
        if not trust:  # the server's sampler (ratio 0) decides: nothing is recorded
            assert spans == []
            tracing.flush()
            assert exporter.get_finished_spans() == ()
        else:
            [span] = spans
            assert span.context.trace_id == trace_id and span.parent.span_id == span_id
            engine = [s for s in exporter.get_finished_spans() if s.name == "llm_request"]
            assert [s.context.trace_id for s in engine] == [trace_id]
    finally:
        tracing.shutdown()


def test_an_untrusted_client_still_joins_its_trace(stub: Any, engine_client: Any) -> None:
    exporter = InMemorySpanExporter()
    _configure(exporter, sampler="parentbased_always_on")  # the default sampler
    try:
        for sampled in (True, False):  # the server samples it either way
            header, trace_id, span_id = _traceparent(sampled)
            stub.GenerateUnary(REQUEST, metadata=(*AUTH, ("traceparent", header)), timeout=60)
            wait_idle(engine_client)
            [span] = [s for s in _servers(exporter) if s.context.trace_id == trace_id]
            assert span.parent.span_id == span_id and span.context.trace_flags.sampled
    finally:
        tracing.shutdown()


def test_a_chosen_trace_id_does_not_pass_a_ratio_sampler() -> None:
    """The ratio sampler reads the trace id; an untrusted client's decision is drawn afresh,
    so a trace id picked to pass (low bits 0) is kept about half the time at ratio 0.5."""
    exporter = InMemorySpanExporter()
    _configure(exporter, sampler="parentbased_traceidratio", sampler_arg=0.5)
    try:
        tracer = tracing.tracer()
        assert tracer is not None
        header = f"00-{1 << 64:032x}-{0xABC:016x}-01"
        kept = sum(tracer.start_span("x", context=tracing.extract({"traceparent": header}))
                   .is_recording() for _ in range(400))
        assert 0 < kept < 400
        # A worker's carrier (not a client's) is still honoured as before.
        worker = tracing.parent_context(tracing.sampled_parent({"traceparent": header}))
        assert tracer.start_span("y", context=worker).is_recording()
    finally:
        tracing.shutdown()


def test_trust_client_sampling_survives_resolution() -> None:
    assert not TracingConfig().trust_client_sampling
    assert TracingConfig(trust_client_sampling=True).resolved({}).trust_client_sampling
    description = TracingConfig.model_fields["trust_client_sampling"].description
    assert description and "traceparent" in description


def test_log_safe_escapes_and_bounds() -> None:
    assert log_safe("plain-id") == "'plain-id'"
    assert log_safe("a\nb\x1b[31m\r\u2028") == r"'a\nb\x1b[31m\r\u2028'"
    long = log_safe("z" * 10_000)
    assert len(long) < 200 and long.endswith("(+9872 chars)")
    assert cap("abc", 3) == "abc" and cap("abcd", 3) == "ab…"


def test_a_control_character_request_id_is_escaped_in_the_log(
        stub: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def boom(*_: Any) -> Any:
        raise RuntimeError("not the request's fault")

    monkeypatch.setattr(grpc_api, "sampling_params", boom)  # an internal error, logged
    evil = "id\n2026-01-01 ERROR forged line\x1b[2J\r"
    request = pb.GenerateRequest(request_id=evil, prompt="x")
    with caplog.at_level(logging.ERROR, logger="zayaserve.frontend"):
        for call in (lambda: stub.GenerateUnary(request, metadata=AUTH, timeout=30),
                     lambda: list(stub.Generate(request, metadata=AUTH, timeout=30))):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INTERNAL
    messages = [r.getMessage() for r in caplog.records if "RuntimeError" in r.getMessage()]
    assert len(messages) == 2
    for message in messages:
        assert repr(evil) in message
        assert not any(c in message for c in "\n\r\x1b")
