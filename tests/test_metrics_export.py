"""The /metrics exposition of engine stats, and the cluster's sums over attention workers."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zayaserve.cluster.control.worker_totals import WorkerTotals
from zayaserve.cluster.frontend.metrics import MetricsCollector
from zayaserve.cluster.frontend.request_tracker import RequestTracker
from zayaserve.replicas.cluster_messages import WorkerReport
from zayaserve.replicas.engine.engine_stats import EngineStats
from zayaserve.router.router_stats import LatencyHistogram, RouterStats, ShardLatency


def _families(stats: dict) -> dict[str, object]:
    m = MetricsCollector()
    m.update_engine_stats(stats)
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def test_counters_gauges_histograms_and_kv_usage() -> None:
    latency = ShardLatency()
    for s in (0.0004, 0.003, 0.003, 7.0):
        latency.observe("shard-1", s)
    fams = _families({
        "num_requests_running": 3, "kv_blocks_free": 25, "kv_blocks_total": 100,
        "num_preemptions": 4, "engine_steps_total": 10,
        "prefix_cache_local_hit_tokens": 32, "prefix_cache_local_queried_tokens": 64,
        "prefix_cache_remote_hit_tokens": 16, "prefix_cache_remote_queried_tokens": 32,
        "expert_tokens_total": [{"shard": "shard-0", "layer": 0, "expert": 1, "value": 9}],
        "diagnostic": "strings are skipped", **latency.histogram().samples()})
    assert fams["zayaserve_num_requests_running"].type == "gauge"
    assert fams["zayaserve_num_preemptions"].type == "counter"
    assert fams["zayaserve_engine_steps"].type == "counter"
    hits = {s.labels["tier"]: s.value for s in fams["zayaserve_prefix_cache_hits"].samples
            if s.name.endswith("_total")}
    queries = {s.labels["tier"]: s.value for s in fams["zayaserve_prefix_cache_queries"].samples
               if s.name.endswith("_total")}
    assert hits == {"local": 32, "remote": 16} and queries == {"local": 64, "remote": 32}
    [usage] = fams["zayaserve_kv_cache_usage_perc"].samples
    assert usage.value == 0.75
    hist = fams["zayaserve_dispatch_latency_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets["0.0005"] == 1 and buckets["0.005"] == 3 and buckets["+Inf"] == 4
    total = [s.value for s in hist.samples if s.name.endswith("_sum")]
    assert abs(total[0] - 7.0064) < 1e-9
    assert "zayaserve_diagnostic" not in fams
    assert "zayaserve_dispatch_latency_seconds_bucket" not in fams  # not a stray gauge


def _report(running: int, preemptions: int, calls: int) -> WorkerReport:
    return WorkerReport(EngineStats(num_requests_running=running, num_preemptions=preemptions),
                        engine_steps=0, router=RouterStats(calls=calls))


def test_cluster_counters_never_go_down_when_workers_leave() -> None:
    totals = WorkerTotals(live_s=3.0, forget_s=10.0)
    totals.report("a", _report(2, 5, 100), now=0.0)
    totals.report("b", _report(1, 1, 50), now=0.0)
    t = totals.totals(now=1.0)
    assert (t["num_requests_running"], t["num_preemptions"], t["router_calls_total"]) == (
        3, 6, 150)
    totals.report("b", _report(1, 2, 60), now=5.0)
    t = totals.totals(now=5.5)  # a stopped reporting: its gauge is gone, its counts stay
    assert (t["num_requests_running"], t["num_preemptions"], t["router_calls_total"]) == (
        1, 7, 160)
    totals.report("c", _report(0, 0, 0), now=20.0)  # a's replacement starts at 0
    t = totals.totals(now=20.5)  # a forgotten; b too (silent since 5 s): both retired
    assert t["num_preemptions"] == 7 and t["router_calls_total"] == 160
    totals.report("b", _report(0, 3, 70), now=21.0)  # b was alive after all
    t = totals.totals(now=21.5)
    assert t["num_preemptions"] == 8 and t["router_calls_total"] == 170  # counted once


def _latency(*calls: tuple[str, float]) -> LatencyHistogram:
    hist = ShardLatency()
    for shard, seconds in calls:
        hist.observe(shard, seconds)
    return hist.histogram()


def test_histograms_sum_per_shard_and_outlive_their_worker() -> None:
    totals = WorkerTotals(live_s=3.0, forget_s=10.0)
    a = _latency(("shard-0", 0.001), ("shard-0", 0.001), ("shard-0", 0.001), ("shard-1", 0.3))
    b = _latency(*[("shard-0", 0.02)] * 4, ("shard-2", 0.3))  # another set of shards
    totals.report("a", WorkerReport(EngineStats(), 0, dispatch_latency=a), now=0.0)
    totals.report("b", WorkerReport(EngineStats(), 0, dispatch_latency=b), now=0.0)

    def counts(now: float) -> dict[str, float]:
        t = totals.totals(now)
        return {s["shard"]: s["value"] for s in t["dispatch_latency_seconds_count"]}

    assert counts(1.0) == {"shard-0": 7, "shard-1": 1, "shard-2": 1}
    t = totals.totals(1.0)
    le = {(s["shard"], s["le"]): s["value"] for s in t["dispatch_latency_seconds_bucket"]}
    assert le[("shard-0", "0.001")] == 3 and le[("shard-0", "0.025")] == 7  # cumulative
    assert counts(20.0) == {"shard-0": 7, "shard-1": 1, "shard-2": 1}  # both forgotten, kept
    totals.report("a", WorkerReport(EngineStats(), 0, dispatch_latency=a), now=21.0)
    assert counts(21.5) == {"shard-0": 7, "shard-1": 1, "shard-2": 1}  # back: counted once


@pytest.mark.parametrize("cuts", [[1, 1, 1, 1], [2, 1, 1], [1, 3], [4], [3, 1]])
def test_every_token_but_the_first_is_one_inter_token_interval(cuts: list[int]) -> None:
    """However the engine's deltas were merged for a reader that fell behind, a request of 4
    tokens gives 1 time to first token and 3 inter-token intervals (tokens that came with the
    first one came 0 s after it)."""
    m = MetricsCollector()
    tracker = RequestTracker(m, "/v1/completions")
    for n in cuts:
        tracker.on_tokens(n)
    tracker.finish()
    samples = {s.name: s.value for f in text_string_to_metric_families(m.render().decode())
               for s in f.samples if s.labels.get("endpoint") == "/v1/completions"}
    assert samples["zayaserve_time_to_first_token_seconds_count"] == 1
    assert samples["zayaserve_inter_token_latency_seconds_count"] == 3
    assert samples["zayaserve_generation_tokens_total"] == 4
