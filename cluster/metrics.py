"""Prometheus metrics of the front ends, in a registry of their own (so several apps, or tests,
in one process never collide on metric names), all prefixed `zayaserve_`.

Front-end metrics are observed per request: counts by endpoint and status, time to first token,
inter-token latency, prompt/generated token counters (tokens/s is `rate()` over the latter),
requests in flight. Engine metrics come from `EngineClient.stats()` at scrape time and
are exported as gauges named `zayaserve_<key>`. A stats value is either

* a number: one unlabelled gauge, e.g. ``{"kv_blocks_free": 812}``; or
* a list of labelled samples, each a mapping of label name -> value plus the key ``"value"``:
  ``{"expert_tokens_total": [{"layer": 0, "expert": 3, "value": 1200}, ...],
  "expert_dispatch_latency_seconds": [{"shard": "b", "value": 0.0021}]}``.
  Per-expert token counts and dispatch latency use this shape with the names above.

Anything else (strings, nested dicts) is skipped, so the engine can add diagnostic fields freely.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from zayaserve.replicas.engine.outputs import StepDelta

PREFIX = "zayaserve_"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_BAD_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def _metric_name(key: str) -> str:
    name = _BAD_NAME_CHARS.sub("_", key)
    return PREFIX + (name if not name[:1].isdigit() else "_" + name)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)  # bools count too: exported as 0/1


class _EngineStatsCollector(Collector):
    """Turns the latest `stats()` snapshot into gauges each time the registry is scraped."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        for key, value in sorted(self.snapshot.items()):
            name = _metric_name(key)
            if _is_number(value):
                family = GaugeMetricFamily(name, f"engine stat {key}", value=float(value))
                yield family
            elif isinstance(value, list) and value and all(
                    isinstance(s, Mapping) and _is_number(s.get("value")) for s in value):
                labels = sorted({str(k) for s in value for k in s if k != "value"})
                family = GaugeMetricFamily(
                    name, f"engine stat {key}",
                    labels=[_BAD_NAME_CHARS.sub("_", lab) for lab in labels])
                for sample in value:
                    family.add_metric([str(sample.get(lab, "")) for lab in labels],
                                      float(sample["value"]))
                yield family


class RequestTracker:
    """Timing of one request: call `on_tokens` whenever it produces tokens, `finish` at the end
    (whatever happened). TTFT is from arrival to the first token; ITL is observed per step
    that produced tokens, divided over the tokens it produced."""

    def __init__(self, metrics: MetricsCollector, endpoint: str) -> None:
        self._metrics = metrics
        self.endpoint = endpoint
        self.arrival = time.perf_counter()
        self._last: float | None = None
        self._done = False
        metrics.requests_in_flight.inc()

    def on_tokens(self, num_new_tokens: int) -> None:
        if num_new_tokens <= 0:
            return
        now = time.perf_counter()
        m = self._metrics
        if self._last is None:
            m.time_to_first_token.labels(self.endpoint).observe(now - self.arrival)
        else:
            per_token = (now - self._last) / num_new_tokens
            for _ in range(num_new_tokens):
                m.inter_token_latency.labels(self.endpoint).observe(per_token)
        self._last = now
        m.generation_tokens.labels(self.endpoint).inc(num_new_tokens)

    def on_delta(self, prompt_index: int, delta: StepDelta) -> None:
        """Call with each delta of the request's prompt_index-th prompt."""
        del prompt_index
        self.on_tokens(sum(len(c.token_ids) for c in delta.completions))

    def on_prompt(self, num_prompt_tokens: int) -> None:
        self._metrics.prompt_tokens.labels(self.endpoint).inc(num_prompt_tokens)

    def finish(self, served: bool = True) -> None:
        """served=False (rejected, client gone) keeps the request out of the latency figures."""
        if self._done:
            return
        self._done = True
        self._metrics.requests_in_flight.dec()
        if served:
            self._metrics.e2e_latency.labels(self.endpoint).observe(
                time.perf_counter() - self.arrival)


class MetricsCollector:
    """The front ends' metrics; `render()` gives the Prometheus text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests", "Requests answered, by endpoint and status code.",
            ["endpoint", "status"], registry=r)
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Arrival to first generated token.",
            ["endpoint"], buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between generated tokens.",
            ["endpoint"], buckets=_ITL_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Arrival to the last byte of the answer.",
            ["endpoint"], buckets=_E2E_BUCKETS, registry=r)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated (rate() gives tokens/s).",
            ["endpoint"], registry=r)
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens admitted.", ["endpoint"], registry=r)
        self.requests_in_flight = Gauge(
            PREFIX + "queue_depth",
            "Generation requests accepted by this front end and not yet answered.", registry=r)
        self.engine_stats_up = Gauge(
            PREFIX + "engine_stats_up", "1 if the last engine stats() call succeeded.",
            registry=r)
        self._engine_stats = _EngineStatsCollector()
        r.register(self._engine_stats)

    def track(self, endpoint: str) -> RequestTracker:
        return RequestTracker(self, endpoint)

    def count_request(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def update_engine_stats(self, stats: Mapping[str, Any] | None) -> None:
        """Replaces the engine stats snapshot; None records a failed stats() call."""
        self.engine_stats_up.set(0 if stats is None else 1)
        if stats is not None:
            self._engine_stats.snapshot = dict(stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)
