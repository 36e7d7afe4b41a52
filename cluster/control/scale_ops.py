"""Resize operations: `POST /v1/cluster/scale` and `zayaserve scale` start one, `GET
/v1/cluster/operations/{id}` follows it (pure logic; the placement controller drives it).

One operation runs at a time. The same request again while it runs returns it (idempotent); a
different one is a conflict (409). Phases: preparing (new shards starting and loading, or, before
a scale-down, every expert copied so that any replica Serve removes leaves all experts served),
committing (the new epoch published; the old one's experts kept through the grace), done,
failed (timed out; the cluster keeps serving what it has).

Serve removes *any* replica on a scale-down, never a chosen one: so the target count is only
lowered once each expert has `removed + 1` copies; the replicas Serve stops drain (leave the map,
finish in-flight calls) and the survivors are then re-planned to the configured replication.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from zayaserve.cluster.control.placement_state import ExpertPlacement

PHASES = ("preparing", "committing", "done", "failed")
RESUMABLE = ("", "cover", "remove", "settle")  # steps a restarted controller goes on with


class ScaleError(ValueError):
    """A resize request that cannot be done; the message names the field."""


class ScaleRefused(RuntimeError):
    """A resize whose plan would make one shard hold more experts than its memory budget."""


class ScaleTooSoon(RuntimeError):
    """A resize by hand within the cooldown of the last one."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"scale: the last resize started less than the cooldown ago; retry in "
                         f"{retry_after_s:.0f} s (scale_cooldown_s)")


def peak_experts_per_shard(num_experts: int, members: int, target: int,
                           replication: int) -> int:
    """The most experts one shard holds on the way from `members` shards to `target`: a
    scale-down first copies each expert to `members - target + 1` shards (cover), so that any
    replica Serve removes is spare; then the survivors hold `replication` copies."""
    after = -(-num_experts * replication // max(target, 1))
    if target >= members:
        return min(after, num_experts)
    cover = max(replication, members - target + 1)
    return min(max(after, -(-num_experts * cover // members)), num_experts)


class ScaleConflict(RuntimeError):
    """Another resize is running; `operation` is it."""

    def __init__(self, operation: dict[str, Any]) -> None:
        self.operation = operation
        super().__init__(f"operation {operation['id']} ({operation['phase']}) is resizing the "
                         f"cluster; wait for it or ask for its targets")


@dataclass
class Operation:
    id: str
    expert_shards: int | None
    attention_workers: int | None
    created: float  # wall clock, for operators
    deadline: float  # monotonic
    start_epoch: int
    phase: str = "preparing"
    step: str = ""  # where a scale-down is: cover, remove, settle
    detail: str = ""
    error: str | None = None
    epoch: int = 0
    history: list[str] = field(default_factory=list)
    reason: str = ""  # why it started: the autoscaler's signals ("" for a resize by hand)

    def view(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("deadline", "step")}

    def record(self, now: float, wall: float) -> dict[str, Any]:
        """For the controller's store: the deadline as wall-clock time (monotonic clocks
        differ between processes)."""
        out = asdict(self)
        out["deadline_wall"] = wall + (out.pop("deadline") - now)
        return out

    @classmethod
    def from_record(cls, d: dict[str, Any], now: float, wall: float) -> Operation:
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        fields["deadline"] = now + (float(d["deadline_wall"]) - wall)
        fields["history"] = list(d.get("history", []))
        return cls(**fields)


class ScaleOperations:
    """Starts, advances and remembers resize operations over one `ExpertPlacement`."""

    def __init__(self, placement: ExpertPlacement, shard_bounds: tuple[int, int],
                 worker_bounds: tuple[int, int], live_workers: Callable[[float], int],
                 timeout_s: float = 600.0) -> None:
        self.placement = placement
        self.last_start: float | None = None  # monotonic
        self.shard_bounds, self.worker_bounds = shard_bounds, worker_bounds
        self.live_workers = live_workers
        self.timeout_s = timeout_s
        self.desired = placement.desired  # the counts asked of Serve: written only here
        self.ops: dict[str, Operation] = {}
        self.current: Operation | None = None

    def _check(self, name: str, value: int | None, bounds: tuple[int, int]) -> None:
        lo, hi = bounds
        if value is not None and not lo <= value <= hi:
            raise ScaleError(f"{name}: must be in [{lo}, {hi}], got {value}")

    def start(self, expert_shards: int | None, attention_workers: int | None, now: float,
              wall: float, budget: int | None = None, cooldown_s: float = 0.0,
              reason: str = "") -> tuple[dict[str, Any], bool]:
        """(the operation, True if this call started it). Raises ScaleError, ScaleConflict,
        ScaleTooSoon (less than `cooldown_s` after the last start), or ScaleRefused when a
        shard would need more than `budget` experts."""
        if expert_shards is None and attention_workers is None:
            raise ScaleError("expert_shards/attention_workers: give at least one")
        if expert_shards is not None and not self.placement.slots:
            raise ScaleError("expert_shards: this app keeps the experts inside the attention "
                             "workers (deployed with expert_shards: 0)")
        self._check("expert_shards", expert_shards, self.shard_bounds)
        self._check("attention_workers", attention_workers, self.worker_bounds)
        cur = self.current
        if cur is not None and cur.phase not in ("done", "failed"):
            if (cur.expert_shards, cur.attention_workers) == (expert_shards, attention_workers):
                return cur.view(), False
            raise ScaleConflict(cur.view())
        if self.last_start is not None and now - self.last_start < cooldown_s:
            raise ScaleTooSoon(cooldown_s - (now - self.last_start))
        p = self.placement
        if expert_shards is not None and budget is not None and p.num_experts:
            peak = peak_experts_per_shard(p.num_experts, len(p.members()), expert_shards,
                                          p.replication)
            if peak > budget:
                raise ScaleRefused(
                    f"expert_shards: resizing to {expert_shards} would make one shard hold "
                    f"{peak} experts (the copies a scale-down makes first included), more than "
                    f"the {budget} its memory budget allows (max_experts_per_shard, or what "
                    f"the shards report they can hold); resize in smaller steps")
        self.last_start = now
        op = Operation(uuid.uuid4().hex[:16], expert_shards, attention_workers, wall,
                       now + self.timeout_s, p.epoch, epoch=p.epoch, reason=reason)
        self.ops[op.id] = op
        while len(self.ops) > 64:  # remember the latest few
            del self.ops[next(iter(self.ops))]
        self.current = op
        if attention_workers is not None:
            self.desired.workers = attention_workers
        if expert_shards is not None:
            members = len(p.members())
            if expert_shards < members:  # cover first: any replica Serve removes is spare
                op.step = "cover"
                p.cover = min(members - expert_shards + 1, members)
                p.propose(p.plan(p.members(), max(p.replication, p.cover), False),
                          f"cover: {p.cover} copies of each expert before removing "
                          f"{members - expert_shards} shards")
                self._note(op, f"copying experts to {p.cover} shards each before Serve removes "
                               f"{members - expert_shards}")
            else:
                op.step = "settle"
                self.desired.shards = expert_shards
                self._note(op, f"asked Serve for {expert_shards} expert shards")
        self.advance(now)
        return op.view(), True

    def _note(self, op: Operation, detail: str) -> None:
        op.detail = detail
        op.history.append(detail)

    def advance(self, now: float) -> None:
        op, p = self.current, self.placement
        if op is None or op.phase in ("done", "failed"):
            return
        op.epoch = p.epoch
        if now > op.deadline:
            self._fail(op, f"timed out after {self.timeout_s:g} s at: {op.detail}", now)
            return
        if op.step == "cover" and p.pending is None and p.covered(p.cover):
            op.step = "remove"
            self.desired.shards = op.expert_shards or self.desired.shards
            self._note(op, f"every expert on {p.cover} shards (epoch {p.epoch}); asked Serve "
                           f"for {self.desired.shards} expert shards")
        if op.step == "remove" and len(p.members()) <= self.desired.shards:
            op.step, p.cover = "settle", 1
            p.propose(p.plan(p.members(), p.replication, True),
                      f"scale-down to {self.desired.shards} shards")
            self._note(op, f"{self.desired.shards} shards left; re-placing at replication "
                           f"{p.replication}")
        if op.step == "settle" or op.expert_shards is None:
            self._settle(op, now)

    def _fail(self, op: Operation, error: str, now: float) -> None:
        op.phase, op.error = "failed", error
        op.history.append(f"failed: {error}")
        # Stop asking Serve for what did not come (e.g. no resources for a new replica):
        # keep what runs; the placement re-plans over the members it has.
        p = self.placement
        p.cover = 1
        if op.expert_shards is not None:
            self.desired.shards = max(len(p.members()), 1)
        if op.attention_workers is not None and (live := self.live_workers(now)):
            self.desired.workers = live

    def _settle(self, op: Operation, now: float) -> None:
        p = self.placement
        shards_done = op.expert_shards is None or (
            p.pending is None and len(p.members()) == op.expert_shards
            and sum(1 for s in p.slots.values() if s.serving) == op.expert_shards
            and set(p.committed) == set(p.members()))
        # Growing: done once the new workers report. Shrinking: done once Serve is asked;
        # the workers it removes drain on their own (up to drain_timeout_s) and report until
        # they stop, so waiting for them would hold the autoscaler and resizes by hand.
        workers_done = (op.attention_workers is None
                        or self.live_workers(now) >= op.attention_workers)
        if not (shards_done and workers_done):
            return
        if op.expert_shards is not None and now < p.previous_until:
            if op.phase != "committing":
                op.phase = "committing"
                self._note(op, f"epoch {p.epoch} serving; old experts kept for the grace")
            return
        op.phase = "done"
        self._note(op, f"done at epoch {p.epoch}")

    def get(self, op_id: str) -> dict[str, Any] | None:
        op = self.ops.get(op_id)
        return None if op is None else op.view()

    def busy(self) -> bool:
        return self.current is not None and self.current.phase not in ("done", "failed")

    # ----- what outlives the controller's replica (controller_store) ----------------------
    def snapshot(self, now: float, wall: float) -> dict[str, Any]:
        return {"last_start_wall": None if self.last_start is None
                else wall - (now - self.last_start),
                "current": self.current.id if self.current else None,
                "ops": [op.record(now, wall) for op in self.ops.values()]}

    def restore(self, d: dict[str, Any], now: float, wall: float, generation: int) -> None:
        """Takes `snapshot()` back after a restart (the cooldown and deadlines count the time
        the controller was down). A resize in flight resumes where it was: every step waits
        on state that was restored (the pending assignment, the cover, the counts asked of
        Serve) or that shards and workers report again, so `advance` goes on from it. One
        whose step this code cannot resume fails, saying where it was."""
        last = d.get("last_start_wall")
        self.last_start = None if last is None else now - max(wall - float(last), 0.0)
        self.ops = {r["id"]: Operation.from_record(r, now, wall) for r in d.get("ops", [])}
        self.current = self.ops.get(d.get("current") or "")
        op = self.current
        if op is None or op.phase in ("done", "failed"):
            return
        restarted = f"the placement controller restarted (generation {generation})"
        if op.step in RESUMABLE and (op.step or op.expert_shards is None):
            self._note(op, f"{restarted}; resuming {op.step or 'the worker resize'}: "
                           f"{op.detail}")
        else:
            self._fail(op, f"{restarted} and cannot resume step {op.step!r}; left: "
                           f"{op.detail}", now)
