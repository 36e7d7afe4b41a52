"""Traces and metrics on a real Ray Serve cluster (tiny model, two expert shards), exported
over OTLP/gRPC to a real `TraceService` receiver inside the test."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest
from cluster_harness import PROMPTS, Cluster, deploy, undeploy

from zayaserve.bench.otlp_sink import OtlpReceiver, ReceivedSpan
from zayaserve.replicas.model.checkpoint_paths import resolve_model
from zayaserve.replicas.model.config import ZayaConfig

pytestmark = pytest.mark.e2e
SERVER, CLIENT = 2, 3  # OTLP span kinds


@pytest.fixture(scope="module")
def traced(ray_session: None) -> Iterator[tuple[Cluster, OtlpReceiver]]:
    receiver = OtlpReceiver()
    cluster = deploy(expert_shards=2, engine={"enable_prefix_caching": True},
                     tracing={"otlp_traces_endpoint": receiver.endpoint})
    yield cluster, receiver
    undeploy()
    receiver.stop()


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent}-01", trace_id, parent


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def _complete_trace(receiver: OtlpReceiver, trace_id: str) -> list[ReceivedSpan]:
    def done() -> bool:
        names = {s.name for s in receiver.of_trace(trace_id)}
        return {"text_completion tiny", "llm_request", "expert_dispatch",
                "expert_shard.dispatch"} <= names
    assert receiver.wait(done), {s.name for s in receiver.of_trace(trace_id)}
    time.sleep(1.0)  # the last dispatches' spans may still be in the batch processors
    return receiver.of_trace(trace_id)


def test_streamed_rest_request_is_one_trace_across_processes(
        traced: tuple[Cluster, OtlpReceiver]) -> None:
    cluster, receiver = traced
    header, trace_id, client_span = _traceparent()
    chunks = list(cluster.client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers={"traceparent": header},
        extra_body={"ignore_eos": True}))
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 8
    spans = _complete_trace(receiver, trace_id)

    ingress = _one(spans, "text_completion tiny")
    assert ingress.kind == SERVER and ingress.component == "ingress"
    assert ingress.parent_span_id == client_span
    a = ingress.attributes
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == "tiny" and a["gen_ai.request.max_tokens"] == 8
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    for key in ("gen_ai.latency.time_in_queue", "gen_ai.latency.time_to_first_token",
                "gen_ai.latency.e2e", "gen_ai.latency.time_in_model_prefill",
                "gen_ai.latency.time_in_model_decode"):
        assert a[key] >= 0, key

    engine = _one(spans, "llm_request")
    assert engine.component == "attention_worker"
    assert engine.parent_span_id == ingress.span_id
    assert engine.attributes["gen_ai.usage.prompt_tokens"] == usage.prompt_tokens
    assert engine.attributes["gen_ai.usage.completion_tokens"] == usage.completion_tokens
    assert engine.events[0] == "queued" and engine.events[-1] == "finished"
    assert {"scheduled", "prefill_chunk", "first_token"} <= set(engine.events)

    dispatches = [s for s in spans if s.name == "expert_dispatch"]
    assert all(d.parent_span_id == engine.span_id and d.kind == CLIENT for d in dispatches)
    # One span per micro-batch step, an event per layer: every layer of the model is there.
    layers = ZayaConfig.from_pretrained(resolve_model("tiny")).num_hidden_layers
    for d in dispatches:
        assert d.events == ["layer"] * layers
    on_shards = [s for s in spans if s.name == "expert_shard.dispatch"]
    assert all(s.component == "expert_shard" and s.kind == SERVER for s in on_shards)
    assert {s.parent_span_id for s in on_shards} <= {d.span_id for d in dispatches}
    assert {s.attributes["zayaserve.shard"] for s in on_shards} == {"shard-0", "shard-1"}


def test_grpc_request_joins_the_callers_trace(traced: tuple[Cluster, OtlpReceiver]) -> None:
    from zayaserve.cluster.protos import generation_pb2 as pb
    from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc

    cluster, receiver = traced
    header, trace_id, client_span = _traceparent()
    with grpc.insecure_channel(f"127.0.0.1:{cluster.cfg.grpc_port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(prompt=PROMPTS[1], sampling=pb.SamplingParams(
            max_tokens=6, temperature=0, ignore_eos=True))
        messages = list(stub.Generate(request, timeout=120,
                                      metadata=(("traceparent", header),)))
    usage = messages[-1].usage
    spans = _complete_trace(receiver, trace_id)
    ingress = _one(spans, "text_completion tiny")
    assert ingress.parent_span_id == client_span and ingress.component == "ingress"
    assert ingress.attributes["zayaserve.endpoint"] == "grpc.Generate"
    assert ingress.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert ingress.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens == 6
    assert _one(spans, "llm_request").parent_span_id == ingress.span_id


def test_batched_dispatch_links_to_every_traced_request(
        traced: tuple[Cluster, OtlpReceiver]) -> None:
    cluster, receiver = traced
    traces = [_traceparent() for _ in range(6)]

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=cluster.base + "/v1", api_key="x", max_retries=0)
        await asyncio.gather(*(client.completions.create(
            model="tiny", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=24, temperature=0,
            extra_headers={"traceparent": header}, extra_body={"ignore_eos": True})
            for i, (header, _, _) in enumerate(traces)))

    asyncio.run(run())
    engine_spans: dict[str, str] = {}  # span id -> trace id

    def all_engine_spans() -> bool:
        for _, trace_id, _ in traces:
            for s in receiver.of_trace(trace_id):
                if s.name == "llm_request":
                    engine_spans[s.span_id] = trace_id
        return len(engine_spans) == len(traces)

    assert receiver.wait(all_engine_spans)

    def linked() -> list[ReceivedSpan]:
        return [s for s in list(receiver.spans)
                if s.name == "expert_dispatch" and len(s.links) >= 2]

    def children(span: ReceivedSpan) -> list[ReceivedSpan]:
        return [s for s in receiver.of_trace(span.trace_id) if s.parent_span_id == span.span_id]

    # Every linked dispatch's shard spans arrive (from other processes, in batches; a shard's
    # span ends a moment after the group's last call).
    assert receiver.wait(lambda: bool(linked()) and all(children(s) for s in linked())), [
        (s.attributes, len(children(s))) for s in linked() if not children(s)][:3]
    for span in linked():
        assert span.parent_span_id == ""  # its own trace, no fake parent
        assert span.attributes["zayaserve.dispatch.requests"] == len(span.links)
        for link_trace, link_span in span.links:
            assert engine_spans.get(link_span) == link_trace
        assert all(s.name == "expert_shard.dispatch" for s in children(span))
        assert len(children(span)) <= 2  # one per shard


def _scrape(cluster: Cluster) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(cluster.base + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _get(page: dict, name: str, **labels: str) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_rest_and_grpc_in_one_registry(
        traced: tuple[Cluster, OtlpReceiver]) -> None:
    from zayaserve.client import ZayaClient

    cluster, _ = traced
    before = _scrape(cluster)
    prompt = " ".join([PROMPTS[0]] * 8)  # a few full KV blocks: the prefix cache is asked
    cluster.client.completions.create(model="tiny", prompt=prompt, max_tokens=5,
                                      extra_body={"ignore_eos": True})
    with ZayaClient(f"127.0.0.1:{cluster.cfg.grpc_port}") as client:
        list(client.stream(prompt, max_tokens=5, ignore_eos=True))
    rest, rpc = "/v1/completions", "grpc.Generate"

    def moved(page: dict) -> bool:  # the workers report to the controller once a second
        hits = "zayaserve_prefix_cache_hits_total"  # the second request hits the first's blocks
        return _get(page, hits, tier="local") > _get(before, hits, tier="local")

    deadline = time.monotonic() + 30
    after = _scrape(cluster)
    while not moved(after) and time.monotonic() < deadline:
        time.sleep(0.5)
        after = _scrape(cluster)
    assert moved(after)
    queries = "zayaserve_prefix_cache_queries_total"
    assert _get(after, queries, tier="local") > _get(before, queries, tier="local")
    assert (queries, (("tier", "remote"),)) in after  # no L2 here: present, at zero
    for endpoint in (rest, rpc):
        for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                     "request_queue_time_seconds", "request_prefill_time_seconds",
                     "request_decode_time_seconds", "request_prompt_tokens",
                     "request_generation_tokens"):
            name = f"zayaserve_{hist}_count"
            assert _get(after, name, endpoint=endpoint) == _get(
                before, name, endpoint=endpoint) + 1, (name, endpoint)
        gen = "zayaserve_generation_tokens_total"
        assert _get(after, gen, endpoint=endpoint) == _get(before, gen, endpoint=endpoint) + 5
        assert _get(after, "zayaserve_inter_token_latency_seconds_count",
                    endpoint=endpoint) > _get(before, "zayaserve_inter_token_latency_seconds_"
                                              "count", endpoint=endpoint)
    assert _get(after, "zayaserve_requests_total", endpoint=rpc, status="OK") == _get(
        before, "zayaserve_requests_total", endpoint=rpc, status="OK") + 1
    assert _get(after, "zayaserve_requests_total", endpoint=rest, status="200") == _get(
        before, "zayaserve_requests_total", endpoint=rest, status="200") + 1
    assert 0.0 <= _get(after, "zayaserve_kv_cache_usage_perc") <= 1.0
    assert ("zayaserve_num_preemptions_total", ()) in after
    assert ("zayaserve_expert_balancedness", ()) in after
    for shard in ("shard-0", "shard-1"):
        count = "zayaserve_dispatch_latency_seconds_count"
        assert _get(after, count, shard=shard) > _get(before, count, shard=shard)
        assert _get(after, "zayaserve_dispatch_latency_seconds_bucket", shard=shard,
                    le="+Inf") == _get(after, count, shard=shard)


def test_every_exported_metric_is_documented(traced: tuple[Cluster, OtlpReceiver]) -> None:
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    cluster, _ = traced
    readme = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    text = httpx.get(cluster.base + "/metrics", timeout=30).text
    families = {f.name for f in text_string_to_metric_families(text)
                if f.name.startswith("zayaserve_") and not f.name.endswith("_created")}
    assert len(families) > 40
    missing = sorted(f for f in families if f"`{f}" not in readme)
    assert not missing, f"not in docs/observability.md's metrics table: {missing}"
