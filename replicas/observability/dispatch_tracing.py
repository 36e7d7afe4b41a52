"""Traces of expert dispatches, across processes.

The unit is a *dispatch group*: the expert dispatches of one micro-batch's step over a group of
consecutive layers (`tracing.dispatch_span_layers`; 0, the default, groups all layers, so a
step makes one span per micro-batch). Each layer's dispatch is an event on it (layer, rows,
rows sent, seconds). A span per layer would multiply the spans, and their cost, by the depth
of the model.

A group serves every request in its micro-batch, so it is nobody's child but one: with exactly
one traced request in the batch it is that request's child (the work is that request's), with
several it starts a trace of its own that links to each of them (no fake parent). The group
span's context travels to the shards in the gRPC metadata (`traceparent`). A shard keeps one
SERVER span per (group, shard) with its calls' tally; it ends once the group's calls stop.

The engine's runner names the traced requests of the micro-batch it runs (`set_step_requests`,
a context variable of its thread) and closes the step's group (`end_step`); the expert backend
asks for the layer's group (`dispatch_group`) and, only when there is one, wraps the router's
dispatch in `traced_dispatch`. With tracing off every hook is one test of None.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from zayaserve.replicas.observability import attributes as attr
from zayaserve.replicas.observability import tracing


class DispatchGroup:
    """The open span of a micro-batch's dispatches over one group of layers."""

    __slots__ = ("span", "index", "metadata")

    def __init__(self, span: Any, index: int) -> None:
        self.span, self.index = span, index
        self.metadata = tuple(tracing.inject(span).items())


class _Step:
    __slots__ = ("links", "group")

    def __init__(self, links: tuple[SpanContext, ...]) -> None:
        self.links = links
        self.group: DispatchGroup | None = None


_STEP: ContextVar[_Step | None] = ContextVar("zayaserve_dispatch_step", default=None)
_CALL_METADATA: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("zayaserve_call_metadata",
                                                                     default=())


def tracing_on() -> bool:
    return tracing.tracer() is not None


def set_step_requests(timelines: Iterable[Any]) -> None:
    """Names the micro-batch's traced requests (their `RequestTimeline`s) for its dispatches."""
    if tracing.tracer() is None:
        return
    seen: dict[int, SpanContext] = {}
    for timeline in timelines:
        ctx = timeline.span_context
        if ctx is not None:
            seen.setdefault(ctx.span_id, ctx)
    _STEP.set(_Step(tuple(seen.values())) if seen else None)


def end_step() -> None:
    """Ends the micro-batch's open dispatch group (after its forward)."""
    step = _STEP.get()
    if step is not None and step.group is not None:
        step.group.span.end()
        step.group = None


def dispatch_group(layer: int) -> DispatchGroup | None:
    """The open group for `layer` of this thread's micro-batch (None: nothing traced)."""
    step = _STEP.get()
    if step is None:
        return None
    tracer = tracing.tracer()
    per_span = tracing.dispatch_span_layers()
    index = layer // per_span if per_span else 0
    if step.group is not None and step.group.index == index and tracer is not None:
        return step.group
    end_step()
    if tracer is None:
        return None
    links = step.links
    alone = len(links) == 1
    span = tracer.start_span(
        "expert_dispatch", kind=SpanKind.CLIENT,
        context=tracing.parent_context(links[0]) if alone else tracing.new_root_context(),
        links=None if alone else [Link(c) for c in links],
        attributes={attr.LINKED_REQUESTS: len(links), attr.LAYER: layer})
    step.group = DispatchGroup(span, index)
    return step.group


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """W3C metadata for a shard call made inside a traced dispatch (else empty)."""
    return _CALL_METADATA.get()


async def traced_dispatch(router: Any, group: DispatchGroup, layer: int, hidden: torch.Tensor,
                          expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`router.dispatch`, its calls carrying the group's context, recorded as an event."""
    token = _CALL_METADATA.set(group.metadata)
    start = time.monotonic()
    try:
        out = await router.dispatch(layer, hidden, expert_ids, weights)
    except BaseException as err:
        group.span.record_exception(err)
        group.span.set_status(Status(StatusCode.ERROR, type(err).__name__))
        raise
    finally:
        _CALL_METADATA.reset(token)
    group.span.add_event("layer", {
        attr.LAYER: layer, attr.ROWS: int(hidden.shape[0]),
        attr.ROWS_SENT: int((expert_ids != router.num_experts).sum()),
        "zayaserve.seconds": time.monotonic() - start})
    return out  # type: ignore[no-any-return]


class _ShardSpan:
    """One open shard span and the tally of its calls (set as attributes when it ends: an
    event per call would cost as much as the call's span did)."""

    __slots__ = ("span", "timer", "calls", "rows", "seconds", "layers")

    def __init__(self, span: Any) -> None:
        self.span = span
        self.timer: asyncio.TimerHandle | None = None
        self.calls = self.rows = 0
        self.seconds = 0.0
        self.layers: list[int] = []

    def end(self, end_ns: int | None = None) -> None:
        self.span.set_attributes({"zayaserve.calls": self.calls, attr.ROWS: self.rows,
                                  "zayaserve.seconds": self.seconds,
                                  "zayaserve.layers": self.layers})
        self.span.end(end_time=end_ns)


class ShardSpans:
    """A shard's SERVER spans: one per (dispatch group, shard), with its calls' count, rows,
    time and layers, ended `idle_s` after the group's last call (at that call's end)."""

    def __init__(self, shard_id: str, idle_s: float = 0.25) -> None:
        self.shard_id, self.idle_s = shard_id, idle_s
        self._open: dict[int, _ShardSpan] = {}

    @contextlib.contextmanager
    def call(self, metadata: Any, layer: int, rows: int) -> Iterator[Any]:
        tracer = tracing.tracer()
        parent = tracing.sampled_parent(tracing.metadata_carrier(metadata)) if tracer else None
        if tracer is None or parent is None:
            yield None
            return
        entry = self._open.get(parent.span_id)
        if entry is None:
            entry = self._open[parent.span_id] = _ShardSpan(tracer.start_span(
                "expert_shard.dispatch", kind=SpanKind.SERVER,
                context=tracing.parent_context(parent), attributes={attr.SHARD: self.shard_id}))
        elif entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        start = time.monotonic()
        try:
            yield entry.span
        except BaseException as err:
            entry.span.record_exception(err)
            entry.span.set_status(Status(StatusCode.ERROR, type(err).__name__))
            raise
        finally:
            entry.calls += 1
            entry.rows += rows
            entry.seconds += time.monotonic() - start
            entry.layers.append(layer)
            entry.timer = asyncio.get_running_loop().call_later(
                self.idle_s, self._end, parent.span_id, time.time_ns())

    def _end(self, key: int, end_ns: int) -> None:
        entry = self._open.pop(key, None)
        if entry is not None:
            entry.end(end_ns)

    def close(self) -> None:
        for entry in self._open.values():
            if entry.timer is not None:
                entry.timer.cancel()
            entry.end()
        self._open.clear()
