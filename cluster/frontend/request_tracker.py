"""One generation request as the front ends see it: its metrics (TTFT, inter-token latency,
end-to-end and the engine's queue/prefill/decode times, token counts) and, when tracing is on,
its SERVER span.

The span follows OpenTelemetry's GenAI conventions (`{operation} {model}`, gen_ai.request.*,
gen_ai.usage.*) with vLLM's gen_ai.latency.* figures, and is parented on the client's W3C
`traceparent` (REST headers or gRPC metadata). A sampled span's context is left in a context
variable of the request's task; the engine clients read it (`current_trace_context`) and hand
it to the worker, whose engine span is its child.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from zayaserve.replicas.engine.outputs import RequestMetrics, StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.request_timeline import metrics_attributes
from zayaserve.replicas.observability import attributes as attr
from zayaserve.replicas.observability import genai_metrics, tracing

if TYPE_CHECKING:
    from zayaserve.cluster.frontend.metrics import MetricsCollector

_TRACE_CONTEXT: ContextVar[dict[str, str] | None] = ContextVar("zayaserve_trace_context",
                                                               default=None)


def current_trace_context() -> dict[str, str] | None:
    """W3C headers of the current request's sampled span (None: not traced)."""
    return _TRACE_CONTEXT.get()


def w3c_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """`traceparent`/`tracestate` of HTTP headers (any case)."""
    if not headers:
        return {}
    found = {k: headers.get(k) for k in ("traceparent", "tracestate")}
    return {k: v for k, v in found.items() if isinstance(v, str)}


class RequestTracker:
    """Call `on_prompt` with the prompt's tokens, `on_delta` with every delta (or `on_tokens`),
    and `finish` once at the end, whatever happened. TTFT is from arrival to the first token;
    ITL is observed once per token after the first (a delta's gap divided over its tokens).
    `operation` ("chat", "text_completion") and `model` name the span, `carrier` holds the
    client's W3C headers."""

    def __init__(self, metrics: MetricsCollector, endpoint: str, operation: str | None = None,
                 model: str | None = None, carrier: Mapping[str, str] | None = None) -> None:
        self._metrics = metrics
        self.endpoint = endpoint
        self.arrival = time.perf_counter()
        self._last: float | None = None
        self.ttft: float | None = None
        self._done = False
        self.prompt_tokens = self.generated_tokens = 0
        self.finish_reasons: list[str] = []
        self.span: Any = None
        self.operation, self.model = operation, model or ""
        if operation is not None and (tracer := tracing.tracer()) is not None:
            self.span = _start_span(tracer, operation, model or "", endpoint, carrier)
        _TRACE_CONTEXT.set(None if self.span is None else tracing.inject(self.span))
        metrics.requests_in_flight.inc()

    def describe(self, params: SamplingParams, response_id: str | None = None) -> None:
        """The request's sampling settings, on its span."""
        if self.span is None:
            return
        self.span.set_attributes({
            attr.REQUEST_MAX_TOKENS: params.max_tokens or 0,
            attr.REQUEST_TEMPERATURE: params.temperature, attr.REQUEST_TOP_P: params.top_p,
            attr.REQUEST_TOP_K: params.top_k, attr.REQUEST_CHOICE_COUNT: params.n,
            attr.REQUEST_N: params.n,
            **({attr.REQUEST_SEED: params.seed} if params.seed is not None else {}),
            **({attr.RESPONSE_ID: response_id} if response_id else {})})

    def on_tokens(self, num_new_tokens: int) -> None:
        if num_new_tokens <= 0:
            return
        now = time.perf_counter()
        m = self._metrics
        # Every token but the first is one inter-token interval, whether tokens arrive one by
        # one or several in a delta (a reader that fell behind gets merged deltas): a delta's
        # gap is spread over its tokens, and the tokens that came with the first one came 0 s
        # after it. So the count is always the tokens less one, however the deltas were cut.
        if self._last is None:
            self.ttft = now - self.arrival
            m.time_to_first_token.labels(self.endpoint).observe(self.ttft)
            gaps, per_token = num_new_tokens - 1, 0.0
        else:
            gaps, per_token = num_new_tokens, (now - self._last) / num_new_tokens
        for _ in range(gaps):
            m.inter_token_latency.labels(self.endpoint).observe(per_token)
        self._last = now
        self.generated_tokens += num_new_tokens
        m.generation_tokens.labels(self.endpoint).inc(num_new_tokens)

    def on_untimed_tokens(self, num_tokens: int) -> None:
        """Tokens generated out of the client's sight (an RSA run's middle rounds): counted,
        kept out of the latency figures."""
        self.generated_tokens += num_tokens
        self._metrics.generation_tokens.labels(self.endpoint).inc(num_tokens)

    def annotate(self, attributes: Mapping[str, Any]) -> None:
        """More attributes on the request's span (when traced)."""
        if self.span is not None:
            self.span.set_attributes(attributes)

    def on_delta(self, prompt_index: int, delta: StepDelta) -> None:
        """Call with each delta of the request's prompt_index-th prompt."""
        del prompt_index
        self.on_tokens(sum(len(c.token_ids) for c in delta.completions))
        self.finish_reasons.extend(c.finish_reason for c in delta.completions
                                   if c.finish_reason is not None)
        if delta.metrics is not None:
            self._on_engine_metrics(delta.metrics)

    def _on_engine_metrics(self, em: RequestMetrics) -> None:
        phases = self._metrics.phase_time
        for phase, seconds in (("queue", em.queue_s), ("prefill", em.prefill_s),
                               ("decode", em.decode_s), ("inference", em.inference_s)):
            phases[phase].labels(self.endpoint).observe(seconds)
        if self.span is not None:
            self.span.set_attributes(metrics_attributes(em))

    def on_prompt(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens += num_prompt_tokens
        self._metrics.prompt_tokens.labels(self.endpoint).inc(num_prompt_tokens)

    def finish(self, served: bool = True, error: BaseException | None = None) -> None:
        """served=False (rejected, client gone) keeps the request out of the latency figures;
        `error` marks its span failed."""
        if self._done:
            return
        self._done = True
        m, e = self._metrics, self.endpoint
        m.requests_in_flight.dec()
        elapsed = time.perf_counter() - self.arrival
        if served:
            m.e2e_latency.labels(e).observe(elapsed)
            m.request_prompt_tokens.labels(e).observe(self.prompt_tokens)
            m.request_generation_tokens.labels(e).observe(self.generated_tokens)
            for reason in self.finish_reasons:
                m.request_success.labels(e, reason).inc()
        genai = genai_metrics.current()
        if genai is not None and self.operation is not None and (served or error is not None):
            genai.record(self.operation, self.model, elapsed, self.ttft, self.generated_tokens,
                         None if error is None else type(error).__name__)
        span, self.span = self.span, None
        if span is None:
            return
        span.set_attributes({
            attr.USAGE_INPUT_TOKENS: self.prompt_tokens, attr.USAGE_PROMPT_TOKENS:
            self.prompt_tokens, attr.USAGE_OUTPUT_TOKENS: self.generated_tokens,
            attr.USAGE_COMPLETION_TOKENS: self.generated_tokens,
            attr.RESPONSE_FINISH_REASONS: self.finish_reasons, attr.LATENCY_E2E: elapsed,
            **({attr.LATENCY_TTFT: self.ttft} if self.ttft is not None else {})})
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.set_attribute("error.type", type(error).__name__)
        elif not served:
            span.set_status(Status(StatusCode.ERROR, "not served"))
        span.end()


def _start_span(tracer: Any, operation: str, model: str, endpoint: str,
                carrier: Mapping[str, str] | None) -> Any:
    span = tracer.start_span(
        f"{operation} {model}".strip(), context=tracing.extract(carrier), kind=SpanKind.SERVER,
        attributes={attr.OPERATION: operation, attr.REQUEST_MODEL: model,
                    attr.RESPONSE_MODEL: model, "zayaserve.endpoint": endpoint})
    if not span.is_recording():  # not sampled: nothing downstream is traced either
        span.end()
        return None
    return span
