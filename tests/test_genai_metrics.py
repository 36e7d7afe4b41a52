"""OpenTelemetry's GenAI server metrics reach a real OTLP receiver: the REST app on uvicorn,
the `openai` client, a gRPC `MetricsService` on a free port, and the SDK's OTLP exporter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from zayaserve.bench.otlp_sink import OtlpMetricsReceiver
from zayaserve.replicas.observability import genai_metrics
from zayaserve.replicas.observability.tracing import TracingConfig


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpMetricsReceiver]:
    r = OtlpMetricsReceiver()
    metrics = genai_metrics.configure(TracingConfig(
        otlp_metrics_endpoint=r.endpoint, metrics_export_interval_s=3600), "test")
    assert metrics is not None
    yield r
    genai_metrics.shutdown()
    r.stop()


def test_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", raising=False)
    before = genai_metrics.current()
    try:
        assert genai_metrics.configure(TracingConfig(), "test") is None
        assert genai_metrics.current() is None
    finally:
        if before is not None:  # the module fixture's, for the next test
            genai_metrics._current = None
            genai_metrics.configure(before.config, "test")


def test_the_environment_names_the_endpoint() -> None:
    cfg = TracingConfig().resolved({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4317"})
    assert cfg.otlp_metrics_endpoint == "http://c:4317"
    assert TracingConfig().resolved({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
                                    ).otlp_metrics_endpoint is None


def test_requests_are_exported(receiver: OtlpMetricsReceiver, server: Any) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    model = client.models.list().data[0].id
    for _ in range(2):
        client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"ignore_eos": True})
    client.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=-1)
    metrics = genai_metrics.current()
    assert metrics is not None and metrics.flush()

    def by_op(name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in receiver.of(name):
            assert p.unit == "s" and p.sum > 0
            assert p.attributes["gen_ai.request.model"] == model
            assert p.resource["zayaserve.component"] == "test"
            op = p.attributes["gen_ai.operation.name"]
            out[op] = out.get(op, 0) + p.count
        return out

    assert by_op("gen_ai.server.request.duration") == {"chat": 2, "text_completion": 1}
    assert by_op("gen_ai.server.time_to_first_token") == {"chat": 2, "text_completion": 1}
    assert by_op("gen_ai.server.time_per_output_token") == {"chat": 2, "text_completion": 1}
