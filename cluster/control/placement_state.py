"""Which shard holds which experts, as epochs that change in two phases (pure logic, no Serve).

A shard is a *slot* with a stable id (`shard-3`), never Serve's replica rank: a replica claims a
vacant slot (a restarted one takes over the experts of the one it replaces) or, when none is
vacant, a new slot, which joins the placement. The committed assignment (slot -> experts, every
layer alike) is what the token routers route by; its number is the epoch.

A change (a shard joined or left, a cover before a scale-down, an EPLB rebalance) is a pending
assignment. Phase one: every slot is told to *hold* the union of what it serves now and what the
pending assignment gives it; shards load the new experts off the serving path and report what
they hold. Phase two, once every slot of the pending assignment holds its experts: the pending
assignment is committed (epoch + 1) and the routers switch on their next map read. Experts a
slot no longer needs stay held for `grace_s` more, so dispatches sent by a router that has not
switched yet still find them; then the slot drops them.

Routing only ever names a slot for an expert it is committed to *and* reports holding, so a
dispatch never reaches a shard without the weights; a slot that is leaving is routed around at
once. `version` moves with every change of the routing map (addresses included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zayaserve.cluster.control.desired_counts import DesiredCounts
from zayaserve.cluster.control.eplb import plan_placement
from zayaserve.cluster.control.expert_load import ExpertLoad
from zayaserve.replicas.cluster_messages import PlacementUpdate
from zayaserve.router.placement import compute_placement

Assignment = dict[str, list[int]]


@dataclass(slots=True)
class Slot:
    id: str
    replica: str | None = None  # None: vacant (its replica died; a restart takes it over)
    address: str | None = None  # set once its experts are loaded and its port is open
    last_seen: float = 0.0
    held: frozenset[int] = field(default_factory=frozenset)  # what the shard reports loaded
    leaving: bool = False  # Serve is stopping it: routed around, then removed

    @property
    def serving(self) -> bool:
        return self.replica is not None and self.address is not None and not self.leaving

    def state(self) -> str:
        if self.replica is None:
            return "vacant"
        if self.leaving:
            return "leaving"
        return "serving" if self.address else "starting"


class ExpertPlacement:
    """Slots, the committed and pending assignments, and the routing map they give."""

    def __init__(self, num_experts: int, num_shards: int, replication: int,
                 heartbeat_timeout_s: float = 4.0, grace_s: float = 3.0,
                 load_window_s: float = 30.0, desired: DesiredCounts | None = None) -> None:
        """`desired`: the counts Serve is asked for (written by resize operations only)."""
        self.num_experts = num_experts
        self.replication = replication
        self.timeout = heartbeat_timeout_s
        self.grace_s = grace_s
        self.desired = desired or DesiredCounts(num_shards, 1)
        self.slots: dict[str, Slot] = {}
        self._next_id = 0
        for _ in range(num_shards):
            self._new_slot()
        # No shards (experts inside the workers): nothing to place.
        self.committed: Assignment = (
            compute_placement(num_experts, list(self.slots), replication) if num_shards else {})
        self.pending: Assignment | None = None
        self.pending_reason = ""
        self.previous: Assignment = {}  # the last epoch's, held until previous_until
        self.previous_until = 0.0
        self.cover = 1  # copies each expert must have before Serve may remove a replica
        self.eplb_redundant: int | None = None  # EPLB on: extra copies for hot experts
        self.epoch = 1 if num_shards else 0
        self.version = 0
        self.load = ExpertLoad(num_experts, load_window_s)
        self._published: PlacementUpdate | None = None  # the last map built (`update`)

    # ----- slots -------------------------------------------------------------------------
    def _new_slot(self) -> Slot:
        slot = Slot(f"shard-{self._next_id}")
        self._next_id += 1
        self.slots[slot.id] = slot
        return slot

    def members(self) -> list[str]:
        """The slots the next assignment places experts on: all but those leaving."""
        return [s for s, slot in self.slots.items() if not slot.leaving]

    def hold(self, slot: str, now: float) -> list[int]:
        """What the slot must hold now: its committed experts, its pending ones, and (during
        the grace after a commit) those of the previous epoch."""
        held = set(self.committed.get(slot, ()))
        if self.pending is not None:
            held.update(self.pending.get(slot, ()))
        if now < self.previous_until:
            held.update(self.previous.get(slot, ()))
        return sorted(held)

    def claim(self, replica: str, now: float) -> tuple[str, list[int]]:
        self.expire(now)
        for slot in self.slots.values():
            if slot.replica == replica:
                return slot.id, self.hold(slot.id, now)
        vacant = next((s for s in self.slots.values() if s.replica is None and not s.leaving),
                      None)
        slot = vacant or self._new_slot()  # no vacancy: a new shard joins
        slot.replica, slot.address, slot.last_seen, slot.held = replica, None, now, frozenset()
        self.reconcile(now)
        return slot.id, self.hold(slot.id, now)

    def register(self, replica: str, slot_id: str, address: str, held: Sequence[int],
                 now: float) -> bool:
        slot = self.slots.get(slot_id)
        if slot is None or slot.leaving or slot.replica not in (None, replica):
            return False  # removed meanwhile, or retaken by another replica
        slot.replica, slot.address, slot.last_seen = replica, address, now
        slot.held = frozenset(held)
        self.version += 1
        self.reconcile(now)
        return True

    def heartbeat(self, replica: str, slot_id: str, held: Sequence[int] | None,
                  now: float) -> bool:
        """False tells the replica its slot was given away or removed (it should re-register)."""
        self.expire(now)
        slot = self.slots.get(slot_id)
        if slot is None or slot.replica != replica:
            return False
        slot.last_seen = now
        if held is not None and frozenset(held) != slot.held:
            slot.held = frozenset(held)
            self.version += 1
        self.reconcile(now)
        return True

    def leave(self, replica: str, slot_id: str, now: float) -> None:
        """Serve is stopping this replica: route around it now; its slot goes when it stops."""
        slot = self.slots.get(slot_id)
        if slot is not None and slot.replica == replica and not slot.leaving:
            slot.leaving = True
            self.version += 1
            self.reconcile(now)

    def expire(self, now: float) -> None:
        """Slots silent past the timeout: removed when leaving or surplus, else vacated."""
        changed = False
        for slot in list(self.slots.values()):
            if slot.replica is None or now - slot.last_seen <= self.timeout:
                if slot.replica is None and not slot.leaving \
                        and len(self.members()) > self.desired.shards:
                    del self.slots[slot.id]  # a vacancy nobody will fill: the pool shrank
                    changed = True
                continue
            self.load.forget(slot.id)
            if slot.leaving or len(self.members()) > self.desired.shards:
                del self.slots[slot.id]
            else:
                slot.replica, slot.address, slot.held = None, None, frozenset()
            changed = True
        if changed:
            self.version += 1

    # ----- two-phase change ----------------------------------------------------------------
    def plan(self, members: list[str], copies: int, use_load: bool) -> Assignment:
        """An assignment of every expert to `copies` (at least) distinct members, moving as
        few experts as it can from the committed one; with EPLB, extra copies of hot experts."""
        e, n = self.num_experts, len(members)
        extra = e * (min(copies, n) - 1)
        load = [1.0] * e
        if use_load and self.eplb_redundant is not None:
            extra += self.eplb_redundant
            observed = self.load.load()
            if sum(observed) > 0:
                load = observed
        extra = min(extra, e * (n - 1))
        current = {x: [s for s in members if x in self.committed.get(s, ())] for x in range(e)}
        plan = plan_placement(load, members, extra,
                              current={x: s for x, s in current.items() if s} or None)
        return {s: sorted(x for x, held in plan.items() if s in held) for s in members}

    def propose(self, assignment: Assignment, why: str) -> None:
        self.pending, self.pending_reason = assignment, why

    def reconcile(self, now: float) -> None:
        """Move the change along: plan when the members changed, commit when ready."""
        if now >= self.previous_until and self.previous:
            self.previous = {}
        members = self.members()
        if not members:
            return
        target = self.pending if self.pending is not None else self.committed
        if set(target) != set(members):
            self.propose(self.plan(members, max(self.replication, self.cover), True),
                         f"members changed to {members}")
        if self.pending is not None and self._ready(self.pending):
            self.previous, self.previous_until = self.committed, now + self.grace_s
            self.committed, self.pending = self.pending, None
            self.epoch += 1
            self.version += 1

    def _ready(self, assignment: Assignment) -> bool:
        for slot_id, experts in assignment.items():
            slot = self.slots.get(slot_id)
            if slot is None or (experts and not (slot.serving and slot.held >= set(experts))):
                return False
        return True

    def covered(self, copies: int) -> bool:
        """Every expert routable on at least `copies` serving slots (committed, held)."""
        replicas = self.routing()
        return all(len(replicas[e]) >= copies for e in range(self.num_experts))

    # ----- what routers and operators read ------------------------------------------------
    def routing(self) -> dict[int, list[str]]:
        return {e: [s for s, slot in self.slots.items()
                    if slot.serving and e in slot.held and e in self.committed.get(s, ())]
                for e in range(self.num_experts)}

    def addresses(self) -> dict[str, str]:
        """Serving slot -> its address."""
        return {s: slot.address for s, slot in self.slots.items()
                if slot.serving and slot.address is not None}

    def update(self, generation: int) -> PlacementUpdate:
        """The routing map as published (reads only: `refresh` first for an up-to-date one).
        Every change of the map moves `version`, so one is built per version, not per ask."""
        cached = self._published
        if cached is not None and cached.order == (generation, self.version):
            return cached
        self._published = PlacementUpdate(
            generation=generation, version=self.version, epoch=self.epoch,
            num_experts=self.num_experts,
            replicas={e: tuple(s) for e, s in self.routing().items()},
            addresses=self.addresses(),
            assignment={s: tuple(x) for s, x in self.committed.items()})
        return self._published

    def refresh(self, now: float) -> None:
        """Expire silent slots and move the change along (what each tick does)."""
        self.expire(now)
        self.reconcile(now)

    # ----- what outlives the controller's replica (controller_store) ----------------------
    def snapshot(self) -> dict[str, Any]:
        """The durable part: counters, slots (ids, experts, and the replica last seen in each),
        the assignments and the cover; not heartbeats' times nor the load (re-measured)."""
        return {"epoch": self.epoch, "version": self.version,
                "next_id": self._next_id, "cover": self.cover,
                "slots": [{"id": s.id, "replica": s.replica, "address": s.address,
                           "held": sorted(s.held), "leaving": s.leaving}
                          for s in self.slots.values()],
                "committed": self.committed, "pending": self.pending,
                "pending_reason": self.pending_reason, "previous": self.previous}

    def restore(self, d: dict[str, Any], now: float) -> None:
        """Takes `snapshot()` back after a restart. Each slot keeps the replica and address it
        had, as if just heard from: its shard's next heartbeat confirms it, silence past the
        timeout vacates it. The previous epoch's experts stay held a full grace from now:
        routers re-read the map only once the controller answers again."""
        def assignment(a: dict[str, Any] | None) -> Assignment:
            return {str(s): [int(x) for x in experts] for s, experts in (a or {}).items()}

        self.epoch, self.version = int(d["epoch"]), int(d["version"])
        self._next_id = int(d["next_id"])
        self.cover = int(d.get("cover", 1))
        self.slots = {s["id"]: Slot(s["id"], s.get("replica"), s.get("address"), now,
                                    frozenset(int(x) for x in s.get("held", ())),
                                    bool(s.get("leaving")))
                      for s in d["slots"]}
        self.committed = assignment(d["committed"])
        self.pending = assignment(d["pending"]) if d.get("pending") is not None else None
        self.pending_reason = str(d.get("pending_reason", ""))
        self.previous = assignment(d.get("previous"))
        self.previous_until = now + self.grace_s if self.previous else 0.0

    def shard_views(self, now: float) -> list[dict[str, Any]]:
        return [{"id": s, "state": slot.state(), "address": slot.address,
                 "experts": self.committed.get(s, []), "held": sorted(slot.held),
                 "hold": self.hold(s, now)} for s, slot in self.slots.items()]
