"""OpenTelemetry tracing, set up the standard way and off by default.

Every zayaserve process (ingress, attention worker, expert shard, placement controller) calls
`configure(config, component)` once. Tracing is on when an OTLP endpoint is known: the
`tracing.otlp_traces_endpoint` field, else `$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
`$OTEL_EXPORTER_OTLP_ENDPOINT` (and not `$OTEL_SDK_DISABLED=true` or
`$OTEL_TRACES_EXPORTER=none`). The sampler and service name follow the same rule
(`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_SERVICE_NAME`); the exporter's own
settings (headers, certificates, timeout, compression) are read by the OTLP exporter from the
`OTEL_EXPORTER_OTLP_*` variables of each process.

Off, `tracer()` is None and every hook in the serving path is one `is None` test: the SDK is
not even imported. Context crosses processes as W3C `traceparent`/`tracestate` strings
(`inject`/`extract`); only sampled contexts are passed on, so an unsampled request costs the
workers and shards nothing.

A client's `traceparent` links the request's span into the client's trace, but whether it is
sampled is the server's sampler's call unless `trust_client_sampling` is on: otherwise any
caller could force full traces on every worker and shard. Span names and string attributes are
cut to `MAX_TRACE_CHARS` (client text such as a model name ends up in them).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from opentelemetry.context import Context, create_key, set_value
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    Tracer,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field

from zayaserve.replicas.observability.safe_text import MAX_TRACE_CHARS, cap

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

Sampler = Literal["always_on", "always_off", "traceidratio", "parentbased_always_on",
                  "parentbased_always_off", "parentbased_traceidratio"]
_SAMPLERS: tuple[str, ...] = Sampler.__args__  # type: ignore[attr-defined]
_PROPAGATOR = TraceContextTextMapPropagator()
INSTRUMENTATION = "zayaserve"
CLUSTER_EVENT_PREFIXES = ("placement.", "cluster.")  # root spans always kept
_FROM_CLIENT = create_key("zayaserve-client-parent")  # marks a context a client handed in


class TracingConfig(BaseModel):
    """Where traces go and which are kept. Unset fields take the standard `OTEL_*` variables
    (read where the application is built, so every replica gets the same settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    otlp_traces_endpoint: str | None = Field(
        default=None, description="OTLP/gRPC collector, e.g. http://otel-collector:4317 (unset: "
        "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then $OTEL_EXPORTER_OTLP_ENDPOINT; none: "
        "tracing off).")
    sampler: Sampler | None = Field(
        default=None, description="OpenTelemetry sampler name (unset: $OTEL_TRACES_SAMPLER, else "
        "parentbased_always_on).")
    sampler_arg: float | None = Field(
        default=None, ge=0, le=1, description="Ratio of the *traceidratio samplers (unset: "
        "$OTEL_TRACES_SAMPLER_ARG, else 1.0).")
    service_name: str | None = Field(
        default=None, description="service.name of every span (unset: $OTEL_SERVICE_NAME, else "
        "zayaserve).")
    disabled: bool = Field(default=False, description="Off whatever the environment says.")
    otlp_metrics_endpoint: str | None = Field(
        default=None, description="OTLP/gRPC collector for OpenTelemetry's GenAI server metrics "
        "(unset: $OTEL_EXPORTER_OTLP_METRICS_ENDPOINT; none: not exported; /metrics serves "
        "Prometheus either way).")
    metrics_export_interval_s: float = Field(
        default=10.0, gt=0, description="How often the GenAI metrics are pushed.")
    dispatch_span_layers: int = Field(
        default=0, ge=0, description="Layers per expert-dispatch span of a traced step (0: "
        "all, one span per micro-batch step; each layer is an event on it).")
    trust_client_sampling: bool = Field(
        default=False, description="Honour the sampled flag of a client's W3C traceparent "
        "(REST header, gRPC metadata). Off: the request's span still joins the client's trace "
        "(same trace id, the client's span as parent), but this server's sampler decides "
        "whether it is recorded, so callers cannot force full traces on every worker and "
        "shard. Turn on only when every caller is trusted.")

    def resolved(self, env: Mapping[str, str] | None = None) -> TracingConfig:
        """These settings with the unset ones taken from `env` (default: os.environ)."""
        env = os.environ if env is None else env
        off = (self.disabled or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
               or env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none")
        endpoint = (self.otlp_traces_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)
        sampler = self.sampler or env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or None
        if sampler is not None and sampler not in _SAMPLERS:
            raise ValueError(f"OTEL_TRACES_SAMPLER: must be one of {_SAMPLERS}, got {sampler!r}")
        arg = self.sampler_arg
        if arg is None and env.get("OTEL_TRACES_SAMPLER_ARG"):
            try:
                arg = float(env["OTEL_TRACES_SAMPLER_ARG"])
            except ValueError:
                raise ValueError("OTEL_TRACES_SAMPLER_ARG: must be a number in [0, 1], got "
                                 f"{env['OTEL_TRACES_SAMPLER_ARG']!r}") from None
        return TracingConfig(
            otlp_traces_endpoint=endpoint, sampler=sampler,  # type: ignore[arg-type]
            sampler_arg=arg, service_name=self.service_name or env.get("OTEL_SERVICE_NAME"),
            disabled=off, dispatch_span_layers=self.dispatch_span_layers,
            trust_client_sampling=self.trust_client_sampling,
            otlp_metrics_endpoint=(self.otlp_metrics_endpoint
                                   or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or None),
            metrics_export_interval_s=self.metrics_export_interval_s)

    @property
    def enabled(self) -> bool:
        return (not self.disabled and self.otlp_traces_endpoint is not None
                and self.sampler != "always_off")


class _Process:
    """This process's tracing: its provider and tracer, and the settings they came from."""

    def __init__(self, config: TracingConfig, provider: TracerProvider, tracer: Tracer) -> None:
        self.config, self.provider, self.tracer = config, provider, tracer


_process: _Process | None = None


def configure(config: TracingConfig | None, component: str,
              exporter: Any = None) -> Tracer | None:
    """Sets up this process's tracer (idempotent for the same settings); None when off.
    `exporter` replaces the OTLP exporter (tests hand in an in-memory one)."""
    global _process
    cfg = (config or TracingConfig()).resolved()
    if not cfg.enabled and exporter is None:
        shutdown()
        return None
    if _process is not None and _process.config == cfg and exporter is None:
        return _process.tracer
    shutdown()
    # Imported only when tracing is on: the SDK costs nothing to a process that never traces.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=cfg.otlp_traces_endpoint)
    resource = Resource.create({"service.name": cfg.service_name or "zayaserve",
                                "zayaserve.component": component,
                                "service.instance.id": f"{component}-{os.getpid()}"})
    provider = TracerProvider(sampler=_sampler(cfg), resource=resource,
                              span_limits=SpanLimits(max_attribute_length=MAX_TRACE_CHARS))
    provider.add_span_processor(_CapNames())
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    _process = _Process(cfg, provider, provider.get_tracer(INSTRUMENTATION))
    return _process.tracer


def _sampler(cfg: TracingConfig) -> Any:
    from opentelemetry.sdk.trace import sampling

    name = cfg.sampler or "parentbased_always_on"
    ratio = 1.0 if cfg.sampler_arg is None else cfg.sampler_arg
    on, off, by_ratio = sampling.ALWAYS_ON, sampling.ALWAYS_OFF, sampling.TraceIdRatioBased(ratio)
    inner, root = {
        "always_on": (on, on),
        "always_off": (off, off),
        "traceidratio": (by_ratio, by_ratio),
        "parentbased_always_on": (sampling.ParentBased(on), on),
        "parentbased_always_off": (sampling.ParentBased(off), off),
        "parentbased_traceidratio": (sampling.ParentBasedTraceIdRatio(ratio), by_ratio),
    }[name]
    return _KeepLinked(inner, None if cfg.trust_client_sampling else root)


def _KeepLinked(inner: Any, client_root: Any = None) -> Any:  # noqa: N802 - a lazy class
    """`inner`, except that a root span linked to a sampled span is kept (a batched dispatch
    is recorded whenever a request it serves is; a ratio sampler would drop most of them), and
    so are the cluster's own events (`placement.*`, `cluster.*`: few, and each one matters).
    With `client_root`, a span whose parent a client handed in (`extract`) is sampled by
    `client_root` as if it began a trace, on a random number rather than the client's trace
    id (a chosen trace id would pass a ratio sampler every time); it keeps the client's trace
    id, parent and tracestate."""
    from opentelemetry.sdk.trace import sampling

    class KeepLinked(sampling.Sampler):
        def should_sample(self, parent_context: Any, trace_id: int, name: str,
                          kind: Any = None, attributes: Any = None, links: Any = None,
                          trace_state: Any = None) -> Any:
            parent = get_current_span(parent_context).get_span_context()
            if client_root is not None and parent.is_valid and parent.is_remote \
                    and parent_context is not None and parent_context.get(_FROM_CLIENT):
                decided = client_root.should_sample(Context(), random.getrandbits(128), name,
                                                    kind, attributes, links)
                return sampling.SamplingResult(decided.decision, decided.attributes,
                                               parent.trace_state)
            if not parent.is_valid and (name.startswith(CLUSTER_EVENT_PREFIXES) or links and any(
                    link.context.trace_flags.sampled for link in links)):
                return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE,
                                               attributes, trace_state)
            return inner.should_sample(parent_context, trace_id, name, kind, attributes,
                                       links, trace_state)

        def get_description(self) -> str:
            trusted = "" if client_root is None else f",client:{client_root.get_description()}"
            return f"KeepLinked{{{inner.get_description()}{trusted}}}"

    return KeepLinked()


def _CapNames() -> Any:  # noqa: N802 - builds an instance of a lazily made class
    """A span processor cutting span names to `MAX_TRACE_CHARS` (attribute values are cut by
    the provider's SpanLimits)."""
    from opentelemetry.sdk.trace import SpanProcessor

    class CapNames(SpanProcessor):
        def on_start(self, span: Any, parent_context: Context | None = None) -> None:
            if len(span.name) > MAX_TRACE_CHARS:
                span.update_name(cap(span.name))

    return CapNames()


def tracer() -> Tracer | None:
    """This process's tracer, or None when tracing is off (the one test every hook makes)."""
    return None if _process is None else _process.tracer


def dispatch_span_layers() -> int:
    """Layers per expert-dispatch span (0: all of a step's)."""
    return 0 if _process is None else _process.config.dispatch_span_layers


def flush(timeout_s: float = 5.0) -> None:
    """Exports what is buffered (before a replica goes away)."""
    if _process is not None:
        _process.provider.force_flush(int(timeout_s * 1000))


def shutdown() -> None:
    global _process
    if _process is not None:
        _process.provider.shutdown()
        _process = None


# ---- context across processes --------------------------------------------------------------


def extract(carrier: Mapping[str, str] | None, from_client: bool = True) -> Context | None:
    """The parent context in W3C headers (REST headers, gRPC metadata, a worker's carrier);
    None when they hold none. A client's (`from_client`) is marked so: its sampled flag is
    honoured only with `trust_client_sampling`."""
    if not carrier:
        return None
    ctx = _PROPAGATOR.extract(carrier)
    if not get_current_span(ctx).get_span_context().is_valid:
        return None
    return set_value(_FROM_CLIENT, True, ctx) if from_client else ctx


def inject(span: Span | SpanContext) -> dict[str, str]:
    """`traceparent` (and `tracestate`) naming `span` as the parent."""
    ctx = span if isinstance(span, SpanContext) else span.get_span_context()
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, set_span_in_context(NonRecordingSpan(ctx)))
    return carrier


def sampled_parent(carrier: Mapping[str, str] | None) -> SpanContext | None:
    """The carrier's span context if it is sampled (only sampled work is traced downstream)."""
    ctx = extract(carrier)
    if ctx is None:
        return None
    parent = get_current_span(ctx).get_span_context()
    return parent if parent.trace_flags.sampled else None


def parent_context(parent: SpanContext) -> Context:
    return set_span_in_context(NonRecordingSpan(parent))


def new_root_context() -> Context:
    """An empty context: a span started in it begins a trace of its own."""
    return Context()


def metadata_carrier(metadata: Any) -> dict[str, str]:
    """The W3C keys of gRPC invocation metadata ((key, value) pairs) as a carrier."""
    return {k: v for k, v in (metadata or ()) if k in ("traceparent", "tracestate")
            and isinstance(v, str)}
