"""Spans of the cluster's own events, made by watching the controller's state after each tick
(the placement logic itself knows nothing of tracing):

* `placement.change` (or `placement.rebalance` for EPLB's): from a pending assignment's
  proposal to its commit as a new epoch, or to its abandonment;
* `cluster.resize`: a resize operation from its start to done/failed, an event per phase.

They are roots of their own traces, always kept whatever the ratio sampler says (they are few,
and an operator asking "what changed at 14:02" wants all of them).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import Status, StatusCode

from zayaserve.cluster.control.controller_state import ControllerState
from zayaserve.replicas.observability import attributes as attr
from zayaserve.replicas.observability import tracing


class PlacementTracer:
    def __init__(self) -> None:
        self._change: Any = None  # the open change span, and the epoch it started from
        self._from_epoch = 0
        self._op: Any = None
        self._op_id: str | None = None
        self._op_phase = ""

    def observe(self, state: ControllerState) -> None:
        tracer = tracing.tracer()
        if tracer is None:
            return
        self._observe_change(tracer, state)
        self._observe_operation(tracer, state)

    def _observe_change(self, tracer: Any, state: ControllerState) -> None:
        p = state.placement
        if self._change is None and p.pending is not None:
            reason = p.pending_reason
            name = "placement.rebalance" if reason.startswith("eplb") else "placement.change"
            self._change = tracer.start_span(name, context=tracing.new_root_context(),
                                             attributes={"zayaserve.placement.reason": reason,
                                                         "zayaserve.placement.from_epoch":
                                                         p.epoch})
            self._from_epoch = p.epoch
        elif self._change is not None and p.pending is None:
            span, self._change = self._change, None
            if p.epoch > self._from_epoch:
                span.set_attribute(attr.PLACEMENT_EPOCH, p.epoch)
                span.add_event("committed", {attr.PLACEMENT_EPOCH: p.epoch})
            else:
                span.set_status(Status(StatusCode.ERROR, "abandoned"))
            span.end()

    def _observe_operation(self, tracer: Any, state: ControllerState) -> None:
        op = state.ops.current
        if op is None:
            return
        if op.id != self._op_id:
            self._end_operation()
            self._op_id, self._op_phase = op.id, ""
            self._op = tracer.start_span("cluster.resize", context=tracing.new_root_context(),
                                         attributes={"zayaserve.operation.id": op.id,
                                                     "zayaserve.operation.expert_shards":
                                                     op.expert_shards or 0,
                                                     "zayaserve.operation.attention_workers":
                                                     op.attention_workers or 0,
                                                     "zayaserve.operation.reason": op.reason})
        if self._op is not None and op.phase != self._op_phase:
            self._op_phase = op.phase
            self._op.add_event(op.phase, {"detail": op.detail})
            if op.phase in ("done", "failed"):
                if op.phase == "failed":
                    self._op.set_status(Status(StatusCode.ERROR, op.error or "failed"))
                self._op.set_attribute(attr.PLACEMENT_EPOCH, state.placement.epoch)
                self._end_operation()

    def _end_operation(self) -> None:
        if self._op is not None:
            self._op.end()
            self._op = None
