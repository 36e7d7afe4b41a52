"""Prometheus metrics, in a registry of their own (so several apps, or tests, in one process
never collide on metric names), all prefixed `zayaserve_`. REST and gRPC share one registry.

Front-end metrics are observed per request (`request_tracker.RequestTracker`): counts by
endpoint and status, time to first token, inter-token latency, end-to-end latency, the engine's
queue/prefill/decode/inference times, prompt and generation tokens per request, finished
requests by reason. Engine metrics come from `EngineClient.stats()` at scrape time (in the
cluster: every worker's, summed by the placement controller's `WorkerTotals`). A stats value is

* a number, or
* a list of labelled samples, each a mapping of label name -> value plus the key ``"value"``:
  ``{"expert_tokens_total": [{"shard": "shard-0", "layer": 0, "expert": 3, "value": 1200}]}``.

Keys ending in `_total` (and the engine's cumulative counts in `COUNTER_KEYS`) are exported as
counters, `<name>_bucket`/`_sum`/`_count` triples as histograms, everything else as gauges, plus
`kv_cache_usage_perc` from the free and total KV blocks. Anything else (strings, nested dicts)
is skipped, so the engine can add diagnostic fields freely.
"""

from __future__ import annotations

import re
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
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from zayaserve.cluster.control.worker_totals import COUNTER_KEYS
from zayaserve.cluster.frontend.request_tracker import RequestTracker

PREFIX = "zayaserve_"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                  60.0, 120.0)
_PHASES = {"queue": "Time a request waited in an engine's queue.",
           "prefill": "First scheduled to first token.", "decode": "First token to the last.",
           "inference": "First scheduled to finished."}
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
# Engine counts exported under a family name of their own, with labels (the prefix-cache tiers).
_RENAMED = {
    "prefix_cache_local_hit_tokens": ("prefix_cache_hits", {"tier": "local"}),
    "prefix_cache_local_queried_tokens": ("prefix_cache_queries", {"tier": "local"}),
    "prefix_cache_remote_hit_tokens": ("prefix_cache_hits", {"tier": "remote"}),
    "prefix_cache_remote_queried_tokens": ("prefix_cache_queries", {"tier": "remote"}),
}

_BAD_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def _metric_name(key: str) -> str:
    name = _BAD_NAME_CHARS.sub("_", key)
    return PREFIX + (name if not name[:1].isdigit() else "_" + name)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)  # bools count too: exported as 0/1


Samples = list[tuple[dict[str, str], float]]


def _samples(value: Any) -> Samples | None:
    """A stat as (labels, value) pairs; None for what /metrics skips."""
    if _is_number(value):
        return [({}, float(value))]
    if isinstance(value, list) and value and all(
            isinstance(s, Mapping) and _is_number(s.get("value")) for s in value):
        return [({_BAD_NAME_CHARS.sub("_", str(k)): str(v) for k, v in s.items()
                  if k != "value"}, float(s["value"])) for s in value]
    return None


def _family(kind: Any, name: str, help_text: str, samples: Samples) -> Metric:
    labels = sorted({k for lab, _ in samples for k in lab})
    family = kind(name, help_text, labels=labels)
    for lab, v in samples:
        family.add_metric([lab.get(k, "") for k in labels], v)
    return family


class _EngineStatsCollector(Collector):
    """Turns the latest `stats()` snapshot into metric families each time it is scraped."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        counters: dict[str, Samples] = {}
        histograms: set[str] = {k[:-len("_bucket")] for k in snap if k.endswith("_bucket")}
        for key, value in sorted(snap.items()):
            samples = _samples(value)
            if samples is None or any(key == h + sfx for h in histograms
                                      for sfx in ("_bucket", "_sum", "_count")):
                continue
            if key in _RENAMED:
                name, extra = _RENAMED[key]
                counters.setdefault(name, []).extend(({**lab, **extra}, v) for lab, v in samples)
            elif key.endswith("_total") or key in COUNTER_KEYS:
                counters.setdefault(key.removesuffix("_total"), []).extend(samples)
            else:
                yield _family(GaugeMetricFamily, _metric_name(key), f"engine stat {key}",
                              samples)
        for name, samples in sorted(counters.items()):
            yield _family(CounterMetricFamily, _metric_name(name), f"engine count {name}",
                          samples)
        for name in sorted(histograms):
            family = _histogram(name, snap)
            if family is not None:
                yield family
        total, free = snap.get("kv_blocks_total"), snap.get("kv_blocks_free")
        if isinstance(total, int | float) and total > 0 and isinstance(free, int | float):
            yield GaugeMetricFamily(_metric_name("kv_cache_usage_perc"),
                                    "Fraction of KV-cache blocks in use (all workers).",
                                    value=1.0 - float(free) / float(total))


def _histogram(name: str, snap: Mapping[str, Any]) -> Metric | None:
    """`name`_bucket (labelled by `le`), _sum and _count samples as one histogram family."""
    buckets, sums = _samples(snap.get(name + "_bucket")), _samples(snap.get(name + "_sum"))
    if not buckets or not sums:
        return None
    series: dict[tuple[tuple[str, str], ...], list[tuple[str, float]]] = {}
    for lab, v in buckets:
        key = tuple(sorted((k, x) for k, x in lab.items() if k != "le"))
        series.setdefault(key, []).append((lab.get("le", "+Inf"), v))
    labels = sorted({k for key in series for k, _ in key})
    family = HistogramMetricFamily(_metric_name(name), f"engine histogram {name}",
                                   labels=labels)
    sum_of = {tuple(sorted(lab.items())): v for lab, v in sums}
    for key, points in sorted(series.items()):
        points.sort(key=lambda p: float(p[0]))
        family.add_metric([dict(key).get(k, "") for k in labels], points, sum_of.get(key, 0.0))
    return family


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
        # Where a request's time went in the engine (`RequestMetrics` of its last delta).
        self.phase_time = {phase: Histogram(
            PREFIX + f"request_{phase}_time_seconds", help_text, ["endpoint"],
            buckets=_PHASE_BUCKETS, registry=r) for phase, help_text in _PHASES.items()}
        self.request_prompt_tokens = Histogram(
            PREFIX + "request_prompt_tokens", "Prompt tokens per served request.",
            ["endpoint"], buckets=_TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram(
            PREFIX + "request_generation_tokens", "Generated tokens per served request.",
            ["endpoint"], buckets=_TOKEN_BUCKETS, registry=r)
        self.request_success = Counter(
            PREFIX + "request_success", "Completions finished, by finish reason.",
            ["endpoint", "finished_reason"], registry=r)
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

    def track(self, endpoint: str, operation: str | None = None, model: str | None = None,
              carrier: Mapping[str, str] | None = None) -> RequestTracker:
        """A request's tracker; with `operation` it is also traced (when tracing is on)."""
        return RequestTracker(self, endpoint, operation, model, carrier)

    def count_request(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def update_engine_stats(self, stats: Mapping[str, Any] | None) -> None:
        """Replaces the engine stats snapshot; None records a failed stats() call."""
        self.engine_stats_up.set(0 if stats is None else 1)
        if stats is not None:
            self._engine_stats.snapshot = dict(stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)
