"""Traces of expert dispatches, across processes.

A dispatch (one layer of one micro-batch) serves every request in its batch, so it is nobody's
child but one: with exactly one traced request in the batch it is that request's child (the
work is that request's), with several it starts a trace of its own that links to each of them
(no fake parent). The dispatch span's context travels to the shards in the gRPC metadata
(`traceparent`), where each shard's handling is a SERVER span under it.

The engine's runner names the traced requests of the micro-batch it runs (`set_step_requests`,
a context variable of its thread); the expert backend reads them (`step_links`) and, only when
there are any, wraps the router's dispatch in `traced_dispatch`. With tracing off every hook is
one test of None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from zayaserve.replicas.observability import attributes as attr
from zayaserve.replicas.observability import tracing

_STEP_LINKS: ContextVar[tuple[SpanContext, ...]] = ContextVar("zayaserve_step_links",
                                                              default=())
_CALL_METADATA: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("zayaserve_call_metadata",
                                                                     default=())


def set_step_requests(timelines: Iterable[Any]) -> None:
    """Names the micro-batch's traced requests (their `RequestTimeline`s) for its dispatches."""
    if tracing.tracer() is None:
        return
    seen: dict[int, SpanContext] = {}
    for timeline in timelines:
        ctx = timeline.span_context
        if ctx is not None:
            seen.setdefault(ctx.span_id, ctx)
    _STEP_LINKS.set(tuple(seen.values()))


def tracing_on() -> bool:
    return tracing.tracer() is not None


def step_links() -> tuple[SpanContext, ...]:
    return _STEP_LINKS.get()


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """W3C metadata for a shard call made inside a traced dispatch (else empty)."""
    return _CALL_METADATA.get()


async def traced_dispatch(router: Any, links: Sequence[SpanContext], layer: int,
                          hidden: torch.Tensor, expert_ids: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """`router.dispatch` inside an `expert_dispatch` span (see the module's docstring)."""
    tracer = tracing.tracer()
    if tracer is None or not links:
        return await router.dispatch(layer, hidden, expert_ids, weights)  # type: ignore[no-any-return]
    alone = len(links) == 1
    span = tracer.start_span(
        "expert_dispatch", kind=SpanKind.CLIENT,
        context=tracing.parent_context(links[0]) if alone else tracing.new_root_context(),
        links=None if alone else [Link(c) for c in links],
        attributes={attr.LAYER: layer, attr.ROWS: int(hidden.shape[0]),
                    attr.ROWS_SENT: int((expert_ids != router.num_experts).sum()),
                    attr.LINKED_REQUESTS: len(links)})
    if not span.is_recording():
        return await router.dispatch(layer, hidden, expert_ids, weights)  # type: ignore[no-any-return]
    token = _CALL_METADATA.set(tuple(tracing.inject(span).items()))
    try:
        out = await router.dispatch(layer, hidden, expert_ids, weights)
    except BaseException as err:
        span.record_exception(err)
        span.set_status(Status(StatusCode.ERROR, type(err).__name__))
        raise
    finally:
        _CALL_METADATA.reset(token)
        span.end()
    return out  # type: ignore[no-any-return]


@contextlib.contextmanager
def shard_span(metadata: Any, shard_id: str, layer: int, rows: int) -> Iterator[Any]:
    """The shard's SERVER span for one Dispatch whose metadata carries a sampled context
    (nothing otherwise)."""
    tracer = tracing.tracer()
    parent = tracing.sampled_parent(tracing.metadata_carrier(metadata)) if tracer else None
    if tracer is None or parent is None:
        yield None
        return
    with tracer.start_as_current_span(
            "expert_shard.dispatch", context=tracing.parent_context(parent),
            kind=SpanKind.SERVER,
            attributes={attr.SHARD: shard_id, attr.LAYER: layer, attr.ROWS: rows}) as span:
        yield span
