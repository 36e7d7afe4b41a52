"""A real OTLP/gRPC trace receiver (opentelemetry-proto's `TraceService` on a free port) that
keeps every span it is sent: the tracing benchmark's collector and the e2e tests'; and a
metrics receiver (`MetricsService`) that keeps every histogram point. They need
the `opentelemetry-proto` package, which the OTLP exporter brings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    events: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)

    @property
    def component(self) -> str:
        return str(self.resource.get("zayaserve.component", ""))


class _Served:
    """A gRPC server on a free loopback port serving `self` through `add_to_server`."""

    def _serve(self, add_to_server: Callable[[Any, Any], None], threads: int) -> None:
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(threads))
        add_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(grace=None)


class OtlpReceiver(_Served, trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._serve(trace_service_pb2_grpc.add_TraceServiceServicer_to_server, 4)

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC method name
        got = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(ReceivedSpan(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        s.kind, {a.key: _value(a.value) for a in s.attributes}, resource,
                        [e.name for e in s.events],
                        [(link.trace_id.hex(), link.span_id.hex()) for link in s.links]))
        with self._lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait(self, check: Callable[[], bool], timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.2)
        return check()


@dataclass
class ReceivedPoint:
    """One histogram data point of one export."""

    metric: str
    unit: str
    attributes: dict[str, Any]
    count: int
    sum: float
    resource: dict[str, Any]


class OtlpMetricsReceiver(_Served, metrics_service_pb2_grpc.MetricsServiceServicer):
    """A real OTLP/gRPC metrics receiver (`MetricsService`) that keeps every histogram point."""

    def __init__(self) -> None:
        self.points: list[ReceivedPoint] = []
        self._serve(metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server, 2)

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC method name
        got: list[ReceivedPoint] = []
        for rm in request.resource_metrics:
            resource = {a.key: _value(a.value) for a in rm.resource.attributes}
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.WhichOneof("data") != "histogram":
                        continue
                    got.extend(ReceivedPoint(
                        m.name, m.unit, {a.key: _value(a.value) for a in p.attributes},
                        p.count, p.sum, resource) for p in m.histogram.data_points)
        with self._lock:
            self.points.extend(got)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def of(self, metric: str) -> list[ReceivedPoint]:
        with self._lock:
            return [p for p in self.points if p.metric == metric]


class SinkProcess:
    """An `OtlpReceiver` in a process of its own (so receiving costs the measured process
    nothing) that only counts the spans."""

    def __init__(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._count = ctx.Value("q", 0)
        ports: Any = ctx.Queue()
        self._stop = ctx.Event()
        self._process = ctx.Process(target=_count_spans, args=(ports, self._count, self._stop),
                                    daemon=True)
        self._process.start()
        self.endpoint = f"http://127.0.0.1:{ports.get(timeout=60)}"

    @property
    def count(self) -> int:
        return int(self._count.value)

    def stop(self) -> None:
        self._stop.set()
        self._process.join(10)


class _Counter(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, count: Any) -> None:
        self.count = count

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC method name
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self.count.get_lock():
            self.count.value += n
        return trace_service_pb2.ExportTraceServiceResponse()


def _count_spans(ports: Any, count: Any, stop: Any) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Counter(count), server)
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    stop.wait()
    server.stop(grace=None)
