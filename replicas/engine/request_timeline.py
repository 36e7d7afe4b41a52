"""Where a request's time goes inside the engine: queued, scheduled, prefill chunks, first
token, preemptions, finish. Every request keeps these few timestamps (they feed the front ends'
queue/prefill/decode histograms through `RequestMetrics` on its final `StepDelta`); a request
that arrived with a sampled trace context also gets the engine's `llm_request` span, a child of
the ingress's span, with the same figures as vLLM-named attributes and an event per stage."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from zayaserve.replicas.engine.latency_window import LatencyWindow
from zayaserve.replicas.engine.outputs import RequestMetrics
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.observability import attributes as attr
from zayaserve.replicas.observability import tracing


class RequestTimeline:
    """One request's timestamps (monotonic) and, when traced, its engine span."""

    __slots__ = ("arrival", "scheduled", "first_token", "preemptions", "prefill_chunks",
                 "local_hit_tokens", "remote_hit_tokens", "span", "window")

    def __init__(self, span: Any = None, window: LatencyWindow | None = None) -> None:
        self.arrival = time.monotonic()
        self.scheduled: float | None = None
        self.first_token: float | None = None
        self.preemptions = self.prefill_chunks = 0
        self.local_hit_tokens = self.remote_hit_tokens = 0
        self.span = span  # an OpenTelemetry Span, or None (not traced)
        self.window = window  # the engine's recent latencies, fed at first token and finish

    @classmethod
    def begin(cls, request_id: str, prompt_len: int, params: SamplingParams,
              trace_context: Mapping[str, str] | None,
              window: LatencyWindow | None = None) -> RequestTimeline:
        tracer = tracing.tracer()
        parent = tracing.sampled_parent(trace_context) if tracer is not None else None
        if tracer is None or parent is None:
            return cls(None, window)
        span = tracer.start_span(
            "llm_request", context=tracing.parent_context(parent), attributes={
                attr.REQUEST_ID: request_id, attr.USAGE_PROMPT_TOKENS: prompt_len,
                attr.USAGE_INPUT_TOKENS: prompt_len, attr.REQUEST_N: params.n,
                attr.REQUEST_TEMPERATURE: params.temperature, attr.REQUEST_TOP_P: params.top_p,
                attr.REQUEST_MAX_TOKENS: params.max_tokens or 0})
        span.add_event("queued")
        return cls(span, window)

    @property
    def span_context(self) -> Any:
        """The engine span's context (parent of the request's L2 fetches), or None."""
        return None if self.span is None else self.span.get_span_context()

    def on_scheduled(self) -> None:
        if self.scheduled is None:
            self.scheduled = time.monotonic()
        if self.span is not None:
            self.span.add_event("scheduled")

    def on_prefill_chunk(self, start: int, num_tokens: int) -> None:
        self.prefill_chunks += 1
        if self.span is not None:
            self.span.add_event("prefill_chunk", {"start": start, "tokens": num_tokens})

    def on_preempted(self) -> None:
        self.preemptions += 1
        if self.span is not None:
            self.span.add_event("preempted")

    def on_tokens(self) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
            if self.window is not None:
                self.window.add_ttft(self.first_token - self.arrival, self.first_token)
            if self.span is not None:
                self.span.add_event("first_token")

    def finish(self, seq_tokens: Sequence[int], finish_reasons: list[str]) -> RequestMetrics:
        """The request's figures; ends its span (once) with them. `seq_tokens`: the output
        tokens of each sequence (the ITL divides the decode time by the longest one's: the
        decode runs until that one ends)."""
        output_tokens, longest = sum(seq_tokens), max(seq_tokens, default=0)
        now = time.monotonic()
        scheduled = self.scheduled if self.scheduled is not None else now
        first = self.first_token if self.first_token is not None else now
        m = RequestMetrics(
            queue_s=scheduled - self.arrival, prefill_s=max(0.0, first - scheduled),
            decode_s=max(0.0, now - first), ttft_s=first - self.arrival, e2e_s=now - self.arrival,
            preemptions=self.preemptions, prefill_chunks=self.prefill_chunks,
            local_hit_tokens=self.local_hit_tokens, remote_hit_tokens=self.remote_hit_tokens)
        if self.window is not None and longest > 1:
            self.window.add_itl(m.decode_s / (longest - 1), now)
        span, self.span = self.span, None
        if span is not None:
            span.add_event("finished")
            span.set_attributes({
                attr.USAGE_COMPLETION_TOKENS: output_tokens,
                attr.USAGE_OUTPUT_TOKENS: output_tokens,
                attr.RESPONSE_FINISH_REASONS: finish_reasons,
                **metrics_attributes(m)})
            span.end()
        return m


def metrics_attributes(m: RequestMetrics) -> dict[str, float | int]:
    """vLLM's gen_ai.latency.* names for the figures (on the engine's and the ingress's span)."""
    return {attr.LATENCY_TIME_IN_QUEUE: m.queue_s, attr.LATENCY_TTFT: m.ttft_s,
            attr.LATENCY_E2E: m.e2e_s, attr.LATENCY_PREFILL: m.prefill_s,
            attr.LATENCY_DECODE: m.decode_s, attr.LATENCY_INFERENCE: m.inference_s,
            attr.PREEMPTIONS: m.preemptions, attr.PREFILL_CHUNKS: m.prefill_chunks,
            attr.PREFIX_LOCAL_HIT_TOKENS: m.local_hit_tokens,
            attr.PREFIX_REMOTE_HIT_TOKENS: m.remote_hit_tokens}
