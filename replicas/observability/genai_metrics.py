"""OpenTelemetry's GenAI server metrics, pushed over OTLP/gRPC when a metrics endpoint is set
(`tracing.otlp_metrics_endpoint` or `$OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`), beside the
Prometheus families the front ends serve on /metrics:

- `gen_ai.server.request.duration` (s): arrival to the last byte, every answered request, with
  `error.type` on the failed ones;
- `gen_ai.server.time_to_first_token` (s): arrival to the first token, successful requests;
- `gen_ai.server.time_per_output_token` (s): after the first token, per further token.

Each point carries `gen_ai.operation.name` (`chat`, `text_completion`) and
`gen_ai.request.model`. The front ends' request trackers record them (`record`); with no
endpoint nothing is set up and the SDK is not imported."""

from __future__ import annotations

from typing import Any

from zayaserve.replicas.observability.tracing import TracingConfig

# The semantic conventions' advised bucket boundaries.
_BUCKETS = {
    "gen_ai.server.request.duration": (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
                                       5.12, 10.24, 20.48, 40.96, 81.92),
    "gen_ai.server.time_to_first_token": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                          0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0),
    "gen_ai.server.time_per_output_token": (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                                            0.5, 0.75, 1.0, 2.5),
}
_DESCRIPTIONS = {
    "gen_ai.server.request.duration": "Generative AI server request duration.",
    "gen_ai.server.time_to_first_token": "Time to generate the first token.",
    "gen_ai.server.time_per_output_token": "Time per output token after the first.",
}


class GenAIMetrics:
    """This process's meter provider, reader and the three histograms."""

    def __init__(self, config: TracingConfig, component: str, exporter: Any = None) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
        from opentelemetry.sdk.resources import Resource

        self.config = config
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            endpoint = config.otlp_metrics_endpoint or ""
            exporter = OTLPMetricExporter(endpoint=endpoint,
                                          insecure=endpoint.startswith("http://"))
        reader = PeriodicExportingMetricReader(
            exporter, export_interval_millis=config.metrics_export_interval_s * 1000)
        views = [View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(b))
                 for name, b in _BUCKETS.items()]
        self.provider = MeterProvider(
            metric_readers=[reader], views=views, resource=Resource.create({
                "service.name": config.service_name or "zayaserve",
                "zayaserve.component": component}))
        meter = self.provider.get_meter("zayaserve")
        self.histograms = {name: meter.create_histogram(name, unit="s", description=text)
                           for name, text in _DESCRIPTIONS.items()}

    def record(self, operation: str, model: str, duration_s: float, ttft_s: float | None,
               output_tokens: int, error_type: str | None = None) -> None:
        attrs = {"gen_ai.operation.name": operation, "gen_ai.request.model": model}
        if error_type is not None:
            attrs["error.type"] = error_type
        h = self.histograms
        h["gen_ai.server.request.duration"].record(duration_s, attrs)
        if error_type is None and ttft_s is not None:
            h["gen_ai.server.time_to_first_token"].record(ttft_s, attrs)
            if output_tokens > 1:
                h["gen_ai.server.time_per_output_token"].record(
                    max(0.0, duration_s - ttft_s) / (output_tokens - 1), attrs)

    def flush(self, timeout_s: float = 10.0) -> bool:
        return bool(self.provider.force_flush(int(timeout_s * 1000)))

    def shutdown(self) -> None:
        self.provider.shutdown()


_current: GenAIMetrics | None = None


def configure(config: TracingConfig | None, component: str,
              exporter: Any = None) -> GenAIMetrics | None:
    """Sets up this process's GenAI metrics (idempotent for the same settings); None when no
    metrics endpoint is set. `exporter` replaces the OTLP exporter."""
    global _current
    cfg = (config or TracingConfig()).resolved()
    if (cfg.disabled or cfg.otlp_metrics_endpoint is None) and exporter is None:
        shutdown()
        return None
    if _current is not None and _current.config == cfg and exporter is None:
        return _current
    shutdown()
    _current = GenAIMetrics(cfg, component, exporter)
    return _current


def current() -> GenAIMetrics | None:
    return _current


def shutdown() -> None:
    global _current
    if _current is not None:
        _current.shutdown()
        _current = None
