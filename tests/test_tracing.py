"""Tracing, one piece at a time: settings from OTEL_* variables, the engine's request span,
dispatch spans (child or links), the sampler's rules, and off meaning off."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags

from zayaserve.replicas.observability import tracing
from zayaserve.replicas.observability.tracing import TracingConfig


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(TracingConfig(otlp_traces_endpoint="http://unused:4317"), "test",
                      exporter=exporter)
    yield exporter
    tracing.shutdown()


def _finished(exporter: InMemorySpanExporter) -> list[Any]:
    tracing.flush()
    return list(exporter.get_finished_spans())


def _context(sampled: bool = True, span_id: int = 0xABC) -> SpanContext:
    return SpanContext(0x1234, span_id, is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0))


def test_settings_come_from_otel_variables() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1",
           "OTEL_SERVICE_NAME": "zs"}
    cfg = TracingConfig().resolved(env)
    assert cfg.enabled and cfg.otlp_traces_endpoint == "http://collector:4317"
    assert (cfg.sampler, cfg.sampler_arg, cfg.service_name) == (
        "parentbased_traceidratio", 0.1, "zs")
    traces_only = {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317"}
    assert TracingConfig().resolved(traces_only).otlp_traces_endpoint == "http://traces:4317"
    # The config's own fields win over the environment.
    mine = TracingConfig(otlp_traces_endpoint="http://mine:4317", sampler="always_on")
    assert mine.resolved(env).otlp_traces_endpoint == "http://mine:4317"
    assert mine.resolved(env).sampler == "always_on"
    assert not TracingConfig().resolved({}).enabled  # off by default
    assert not TracingConfig().resolved({**env, "OTEL_SDK_DISABLED": "true"}).enabled
    assert not TracingConfig().resolved({**env, "OTEL_TRACES_EXPORTER": "none"}).enabled
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        TracingConfig().resolved({"OTEL_TRACES_SAMPLER": "sometimes"})
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        TracingConfig().resolved({"OTEL_TRACES_SAMPLER_ARG": "ten percent"})


def test_cluster_config_names_a_bad_tracing_field() -> None:
    from zayaserve.cluster.config import ClusterConfig, ClusterConfigError

    with pytest.raises(ClusterConfigError, match="tracing.sampler_arg"):
        ClusterConfig.create(tracing={"sampler_arg": 2})
    with pytest.raises(ClusterConfigError, match="tracing.endpoint"):
        ClusterConfig.create(tracing={"endpoint": "x"})


def test_off_means_no_tracer_and_no_sdk_work(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert tracing.configure(TracingConfig(), "test") is None
    assert tracing.tracer() is None
    from zayaserve.replicas.engine.params import SamplingParams
    from zayaserve.replicas.engine.request_timeline import RequestTimeline

    # A sampled caller context changes nothing while tracing is off.
    carrier = tracing.inject(_context())
    assert RequestTimeline.begin("r", 4, SamplingParams(), carrier).span is None


def test_w3c_context_round_trips() -> None:
    carrier = tracing.inject(_context())
    assert carrier["traceparent"] == f"00-{0x1234:032x}-{0xABC:016x}-01"
    parent = tracing.sampled_parent(carrier)
    assert parent is not None and parent.span_id == 0xABC
    assert tracing.sampled_parent(tracing.inject(_context(sampled=False))) is None
    assert tracing.sampled_parent({"traceparent": "garbage"}) is None
    assert tracing.sampled_parent(None) is None
    assert tracing.metadata_carrier([("traceparent", "x"), ("authorization", "y")]) == {
        "traceparent": "x"}


def test_engine_span_is_the_callers_child_with_its_stages(
        exported: InMemorySpanExporter, tiny_checkpoint: Any) -> None:
    from zayaserve.replicas.engine.config import EngineConfig
    from zayaserve.replicas.engine.llm_engine import LLMEngine
    from zayaserve.replicas.engine.params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), num_kv_blocks=64,
                                    max_num_batched_tokens=8, enable_prefix_caching=True))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request("traced", list(range(3, 23)), params,
                       trace_context=tracing.inject(_context()))
    engine.add_request("plain", list(range(3, 23)), params)
    engine.add_request("unsampled", list(range(3, 23)), params,
                       trace_context=tracing.inject(_context(sampled=False)))
    finals = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.finished:
                finals[delta.request_id] = delta
    [span] = _finished(exported)
    assert span.name == "llm_request" and span.parent.span_id == 0xABC
    assert span.context.trace_id == 0x1234
    events = [e.name for e in span.events]
    assert events[0] == "queued" and events[-1] == "finished"
    assert events.count("prefill_chunk") == 3  # 20 prompt tokens, 8 per step
    a = span.attributes
    assert a["gen_ai.usage.prompt_tokens"] == 20 and a["gen_ai.usage.completion_tokens"] == 4
    assert a["gen_ai.request.id"] == "traced" and a["zayaserve.request.prefill_chunks"] == 3
    m = finals["traced"].metrics
    assert m is not None and a["gen_ai.latency.time_in_queue"] == m.queue_s
    assert m.prefill_chunks == 3 and m.e2e_s >= m.ttft_s >= m.queue_s >= 0
    assert finals["plain"].metrics is not None  # every request gets figures, traced or not


def test_aborted_request_ends_its_span(exported: InMemorySpanExporter,
                                       tiny_checkpoint: Any) -> None:
    from zayaserve.replicas.engine.config import EngineConfig
    from zayaserve.replicas.engine.llm_engine import LLMEngine
    from zayaserve.replicas.engine.params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), num_kv_blocks=64))
    engine.add_request("gone", [3, 4, 5], SamplingParams(max_tokens=50),
                       trace_context=tracing.inject(_context()))
    engine.step()
    engine.abort_request("gone")
    [span] = _finished(exported)
    assert span.attributes["gen_ai.response.finish_reasons"] == ("abort",)


class _Router:
    num_experts = 4

    def __init__(self) -> None:
        self.metadata: list[Any] = []

    async def dispatch(self, layer: int, hidden: torch.Tensor, *_: Any) -> torch.Tensor:
        from zayaserve.replicas.observability.dispatch_tracing import trace_metadata

        self.metadata.append(dict(trace_metadata()))
        return hidden


class _Timeline:
    def __init__(self, ctx: SpanContext | None) -> None:
        self.span_context = ctx


def _step(requests: list[SpanContext | None], layers: int = 3) -> _Router:
    """One micro-batch's forward as the runner and the expert backend drive the hooks."""
    from zayaserve.replicas.observability.dispatch_tracing import (
        dispatch_group,
        end_step,
        set_step_requests,
        traced_dispatch,
    )

    router = _Router()
    hidden = torch.zeros(3, 4)
    ids = torch.tensor([0, 4, 2])  # one skip row (expert 4 of 4)
    set_step_requests([_Timeline(c) for c in requests])
    for layer in range(layers):
        group = dispatch_group(layer)
        assert group is not None
        asyncio.run(traced_dispatch(router, group, layer, hidden, ids, torch.ones(3)))
    end_step()
    return router


def test_a_step_of_one_request_is_one_span_under_it(exported: InMemorySpanExporter) -> None:
    router = _step([_context(), None])
    [span] = _finished(exported)
    assert span.name == "expert_dispatch" and span.parent.span_id == 0xABC
    assert not span.links
    layers = [e for e in span.events if e.name == "layer"]
    assert [e.attributes["zayaserve.layer"] for e in layers] == [0, 1, 2]
    assert all(e.attributes["zayaserve.dispatch.rows_sent"] == 2 for e in layers)
    # The shards get the group span as their parent.
    assert {m["traceparent"].split("-")[2] for m in router.metadata} == {
        f"{span.context.span_id:016x}"}


def test_layer_groups_split_a_step() -> None:
    exporter = InMemorySpanExporter()
    tracing.configure(TracingConfig(otlp_traces_endpoint="http://unused:4317",
                                    dispatch_span_layers=2), "test", exporter=exporter)
    try:
        _step([_context()], layers=5)
        spans = _finished(exporter)
    finally:
        tracing.shutdown()
    assert [len([e for e in s.events if e.name == "layer"]) for s in spans] == [2, 2, 1]


def test_a_step_of_many_requests_links_to_each() -> None:
    exporter = InMemorySpanExporter()
    # A 0% ratio sampler: the dispatch is kept anyway because the requests it serves are.
    tracing.configure(TracingConfig(otlp_traces_endpoint="http://unused:4317",
                                    sampler="parentbased_traceidratio", sampler_arg=0.0),
                      "test", exporter=exporter)
    try:
        _step([_context(span_id=1), _context(span_id=2), _context(span_id=2)])
        [span] = _finished(exporter)
        assert span.parent is None
        assert sorted(link.context.span_id for link in span.links) == [1, 2]
        assert span.attributes["zayaserve.dispatch.requests"] == 2
        tracer = tracing.tracer()
        assert tracer is not None
        assert not tracer.start_span("other root").is_recording()  # 0% for everything else
        assert tracer.start_span("placement.change").is_recording()  # cluster events: always
    finally:
        tracing.shutdown()


def test_untraced_steps_make_no_group(exported: InMemorySpanExporter) -> None:
    from zayaserve.replicas.observability.dispatch_tracing import (
        dispatch_group,
        end_step,
        set_step_requests,
    )

    set_step_requests([_Timeline(None), _Timeline(None)])
    assert dispatch_group(0) is None
    end_step()
    assert not _finished(exported)


def test_a_shard_keeps_one_span_per_group_and_shard(exported: InMemorySpanExporter) -> None:
    from zayaserve.replicas.observability.dispatch_tracing import ShardSpans

    spans = ShardSpans("shard-1", idle_s=0.05)
    metadata = list(tracing.inject(_context()).items()) + [("authorization", "Bearer x")]

    async def calls() -> None:
        for layer in range(3):
            with spans.call(metadata, layer, 8):
                await asyncio.sleep(0.001)
        with spans.call([("authorization", "Bearer x")], 0, 8) as none:
            assert none is None  # an untraced call
        await asyncio.sleep(0.2)  # idle: the span ends

    asyncio.run(calls())
    [span] = _finished(exported)
    assert span.name == "expert_shard.dispatch" and span.parent.span_id == 0xABC
    assert span.attributes["zayaserve.shard"] == "shard-1"
    assert span.attributes["zayaserve.layers"] == (0, 1, 2)
    assert span.attributes["zayaserve.calls"] == 3
    assert span.attributes["zayaserve.dispatch.rows"] == 24
    assert 0 < span.attributes["zayaserve.seconds"] < (span.end_time - span.start_time) / 1e9
    assert span.end_time - span.start_time < 0.1e9  # ended at its last call, not at idle


def test_resize_and_epoch_commit_become_spans(exported: InMemorySpanExporter) -> None:
    from test_placement_controller import Sim

    from zayaserve.cluster.control.controller_state import ControllerState
    from zayaserve.cluster.control.placement_tracing import PlacementTracer

    st = ControllerState(num_experts=8, num_shards=2, replication=1, grace_s=2)
    sim, spans = Sim(st), PlacementTracer()
    for _ in range(2):
        sim.start()
    sim.step()
    op, _ = st.ops.start(3, None, sim.now, 0.0)
    slot, _ = st.placement.claim("late", sim.now)
    st.placement.register("late", slot, "h:late", [], sim.now)
    sim.shards["late"] = (slot, set())
    for _ in range(40):
        sim.step()
        spans.observe(st)
        if st.ops.get(op["id"])["phase"] == "done":
            break
    by_name = {s.name: s for s in _finished(exported)}
    change, resize = by_name["placement.change"], by_name["cluster.resize"]
    assert change.parent is None and change.attributes["zayaserve.placement.from_epoch"] == 1
    assert change.attributes["zayaserve.placement.epoch"] == 2
    assert [e.name for e in change.events] == ["committed"]
    assert resize.attributes["zayaserve.operation.id"] == op["id"]
    assert resize.attributes["zayaserve.operation.expert_shards"] == 3
    assert resize.attributes["zayaserve.operation.reason"] == ""  # by hand, not the autoscaler
    assert [e.name for e in resize.events][-1] == "done"
