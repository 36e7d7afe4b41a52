"""A placement controller that remembers (unit level): its state round-trips through the store,
a restart resumes the placement and a resize at any step (cover, remove, settle) with simulated
shards, versions and generations only grow, a superseded replica stops writing, and workers and
routers never adopt an older map."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from test_placement_controller import Sim

from zayaserve.cluster.control.controller_state import ControllerState
from zayaserve.cluster.control.controller_store import (
    SCHEMA_VERSION,
    ControllerRecord,
    GcsControllerStore,
    MemoryControllerStore,
    decode,
    encode,
)
from zayaserve.cluster.control.scale_ops import ScaleTooSoon
from zayaserve.replicas.cluster_messages import WorkerReport
from zayaserve.replicas.engine.engine_stats import EngineStats

WALL = 1_700_000_000.0  # wall clock = WALL + the simulation's clock (+ downtime)


def boot(store: MemoryControllerStore, now: float, wall: float, deployment: str = "d1",
         **kw: Any) -> tuple[ControllerState, ControllerRecord, str]:
    """What the controller's __init__ does: claim a generation, restore, save."""
    kw = {"num_experts": 8, "num_shards": 2, "replication": 1, "grace_s": 1.0, **kw}
    st = ControllerState(**kw)
    rec = ControllerRecord(store, deployment)
    stored, same = rec.start()
    note = st.restore(stored, now, wall, rec.generation, resume=same) if stored else ""
    assert rec.save(st.snapshot(now, wall))
    return st, rec, note


def restart(sim: Sim, store: MemoryControllerStore, rec: ControllerRecord,
            down_s: float = 2.0, **kw: Any) -> tuple[ControllerRecord, str]:
    """Saves as the tick would, then a new controller process (another monotonic clock) takes
    over; the simulated shards keep running and heartbeat to it."""
    assert rec.save(sim.state.snapshot(sim.now, WALL + sim.now))
    sim.now += down_s
    st, rec2, note = boot(store, sim.now, WALL + sim.now, **kw)
    sim.state = st
    return rec2, note


def routing(st: ControllerState, now: float) -> tuple[Any, Any]:
    st.placement.refresh(now)
    m = st.placement.update(generation=1)
    return m.replicas, m.addresses


def test_store_round_trip_and_schema() -> None:
    store = MemoryControllerStore()
    assert store.load() is None
    st = ControllerState(num_experts=8, num_shards=3, replication=2)
    Sim(st).start()
    snap = st.snapshot(5.0, WALL)
    store.save({"generation": 4, "state": snap})
    loaded = store.load()
    assert loaded is not None and loaded["schema"] == SCHEMA_VERSION
    assert loaded["generation"] == 4 and loaded["state"] == json.loads(json.dumps(snap))
    # A restored state snapshots to the same document (bar the new generation's version).
    again = ControllerState(num_experts=8, num_shards=3, replication=2)
    again.restore(loaded["state"], 9.0, WALL + 4, generation=5)
    snap2 = again.snapshot(9.0, WALL + 4)
    assert snap2["placement"]["version"] == snap["placement"]["version"] + 1
    snap2["placement"]["version"] -= 1
    assert snap2 == json.loads(json.dumps(snap))
    assert decode(encode({"x": 1})) == {"x": 1, "schema": SCHEMA_VERSION}
    assert decode(b"not json") is None and decode(b"") is None
    assert decode(json.dumps({"schema": SCHEMA_VERSION + 1}).encode()) is None


def test_gcs_store_uses_ray_internal_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.experimental import internal_kv

    kv: dict[tuple[str | None, str], bytes] = {}

    def put(key: str, value: bytes, overwrite: bool = True, *,
            namespace: str | None = None) -> bool:
        kv[(namespace, key)] = value
        return True

    monkeypatch.setattr(internal_kv, "_internal_kv_put", put)
    monkeypatch.setattr(internal_kv, "_internal_kv_get",
                        lambda key, *, namespace=None: kv.get((namespace, key)))
    store = GcsControllerStore("placement-controller/app")
    assert store.load() is None
    store.save({"generation": 2})
    assert list(kv) == [("zayaserve", "placement-controller/app")]
    assert store.load() == {"generation": 2, "schema": SCHEMA_VERSION}


def test_generations_grow_unchanged_state_is_not_rewritten_and_old_replica_stops() -> None:
    store = MemoryControllerStore()
    st, rec, _ = boot(store, 0.0, WALL)
    assert rec.generation == 1
    saves = store.saves
    assert rec.save(st.snapshot(0.5, WALL + 0.5)) and store.saves == saves  # nothing changed
    _, rec2, _ = boot(store, 1.0, WALL + 1)
    _, rec3, _ = boot(store, 2.0, WALL + 2)
    assert (rec2.generation, rec3.generation) == (2, 3)
    st.placement.version += 5  # the old replica, still running, changes its map
    saves = store.saves
    assert not rec.save(st.snapshot(3.0, WALL + 3)) and rec.superseded
    assert store.saves == saves and store.load()["generation"] == 3  # type: ignore[index]


def test_restart_keeps_epoch_map_and_slots_and_versions_grow() -> None:
    store = MemoryControllerStore()
    st, rec, _ = boot(store, 0.0, WALL, num_shards=3, replication=2)
    sim = Sim(st)
    for _ in range(3):
        sim.start()
    for _ in range(4):
        sim.step()
    before = st.view(sim.now)
    routes = routing(st, sim.now)
    rec2, note = restart(sim, store, rec, num_shards=3, replication=2)
    st2 = sim.state
    assert "resumed epoch" in note and rec2.generation == rec.generation + 1
    assert st2.placement.epoch == before["epoch"] and st2.placement.version > before["version"]
    assert routing(st2, sim.now) == routes  # routed as before, with no heartbeat yet
    for _ in range(10):  # the shards' heartbeats confirm their slots: nothing is re-planned
        sim.step()
    assert st2.placement.epoch == before["epoch"]
    assert [s["state"] for s in st2.view(sim.now)["shards"]] == ["serving"] * 3


def test_a_slot_whose_shard_died_during_the_restart_is_vacated_then_retaken() -> None:
    store = MemoryControllerStore()
    st, rec, _ = boot(store, 0.0, WALL, num_shards=2, replication=2, heartbeat_timeout_s=2)
    sim = Sim(st)
    dead = sim.start()
    sim.start()
    sim.step()
    sim.stop(dead, graceful=False)  # died while the controller was down
    restart(sim, store, rec, num_shards=2, replication=2, heartbeat_timeout_s=2)
    sim.run_until(lambda: "vacant" in [s["state"] for s in sim.state.view(sim.now)["shards"]])
    sim.start()  # Serve's replacement takes the vacant slot over
    sim.run_until(lambda: all(len(r) == 2 for r in sim.routed().values()))


@pytest.mark.parametrize("step", ["settle-up", "cover", "remove", "settle-down"])
def test_a_resize_in_flight_resumes_after_a_restart(step: str) -> None:
    store = MemoryControllerStore()
    shards = 2 if step == "settle-up" else 3
    st, rec, _ = boot(store, 0.0, WALL, num_shards=shards)
    sim = Sim(st)
    for _ in range(shards):
        sim.start()
    sim.step()
    epoch = st.placement.epoch
    op, _ = st.ops.start(5 - shards, None, sim.now, WALL + sim.now)
    if step == "settle-up":  # Serve started the third replica before the controller died
        sim.start()
    if step in ("remove", "settle-down"):
        sim.run_until(lambda: st.ops.current.step == "remove")  # type: ignore[union-attr]
    if step == "settle-down":
        sim.stop(next(iter(sim.shards)))  # Serve's pick
        sim.run_until(lambda: st.ops.current.step == "settle")  # type: ignore[union-attr]
    at = st.ops.current.step  # type: ignore[union-attr]
    desired = st.desired.shards
    rec, _ = restart(sim, store, rec, num_shards=shards)
    st = sim.state
    resumed = st.ops.get(op["id"])
    assert resumed is not None and resumed["phase"] in ("preparing", "committing")
    assert st.ops.current.step == at and st.desired.shards == desired  # type: ignore[union-attr]
    assert "restarted (generation 2); resuming" in resumed["history"][-1]
    for _ in range(100):  # Serve follows the desired count (a removed replica's leave lost)
        if len(sim.shards) > st.desired.shards:
            sim.stop(next(iter(sim.shards)), graceful=False)
        if st.ops.get(op["id"])["phase"] == "done":  # type: ignore[index]
            break
        sim.step()
        assert all(sim.routed()[e] for e in range(8)), sim.routed()  # never an expert unserved
    assert st.ops.get(op["id"])["phase"] == "done"  # type: ignore[index]
    assert st.placement.epoch > epoch and len(st.placement.committed) == 5 - shards
    assert all(len(r) == 1 for r in sim.routed().values())
    assert st.desired.shards == 5 - shards


def test_cooldown_deadline_and_desired_workers_survive_a_restart() -> None:
    store = MemoryControllerStore()
    st, rec, _ = boot(store, 0.0, WALL, attention_workers=1)
    sim = Sim(st)
    sim.start()
    sim.start()
    st.ops.start(None, 3, sim.now, WALL + sim.now, cooldown_s=60)
    rec, _ = restart(sim, store, rec, down_s=10.0)  # the cooldown counts the downtime
    st = sim.state
    assert st.desired.workers == 3 and st.ops.busy()
    for w in ("w1", "w2", "w3"):
        st.report_worker(w, WorkerReport(EngineStats(), 0), sim.now)
    st.tick(sim.now)
    assert not st.ops.busy()
    with pytest.raises(ScaleTooSoon) as soon:
        st.ops.start(None, 2, sim.now, WALL + sim.now, cooldown_s=60)
    assert 45 < soon.value.retry_after_s < 55
    # A restart past an operation's deadline (wall clock) fails it as timed out (a growth:
    # it waits for workers that never come; a shrink is done once Serve is asked).
    st.ops.last_start = None
    op, _ = st.ops.start(None, 4, sim.now, WALL + sim.now)
    assert rec.save(st.snapshot(sim.now, WALL + sim.now))
    st2, _, _ = boot(store, 0.0, WALL + sim.now + 700)  # 700 s later, a new monotonic clock
    st2.ops.advance(0.0)
    failed = st2.ops.get(op["id"])
    assert failed is not None and failed["phase"] == "failed" and "timed out" in failed["error"]


def test_an_unknown_step_fails_visibly_and_another_deployment_starts_afresh() -> None:
    store = MemoryControllerStore()
    st, rec, _ = boot(store, 0.0, WALL, num_shards=3)
    sim = Sim(st)
    for _ in range(3):
        sim.start()
    sim.step()
    op, _ = st.ops.start(2, None, sim.now, WALL + sim.now)
    snap = st.snapshot(sim.now, WALL + sim.now)
    snap["ops"]["ops"][-1]["step"] = "migrate"  # a step an older/newer build had
    store.save({"generation": rec.generation, "deployment": "d1", "state": snap})
    st2, _, _ = boot(store, 0.0, WALL + 5, num_shards=3)
    failed = st2.ops.get(op["id"])
    assert failed is not None and failed["phase"] == "failed"
    assert "restarted (generation 2) and cannot resume step 'migrate'" in failed["error"]
    assert "left: copying experts" in failed["error"] and not st2.ops.busy()
    version = st2.placement.version
    # A new deployment of the app (new code version): a fresh placement, versions still grow.
    st3, rec3, note = boot(store, 0.0, WALL + 9, deployment="d2", num_shards=3)
    assert "fresh placement" in note and rec3.generation == 3
    assert st3.placement.epoch == 1 and st3.placement.version == version + 1
    assert st3.ops.get(op["id"]) is None
    # Another config under the same deployment name is not resumed either.
    st4, _, note = boot(store, 0.0, WALL + 9, deployment="d2", num_shards=2)
    assert "fresh placement" in note and st4.placement.version > st3.placement.version


def test_controller_deployment_resumes_from_its_store() -> None:
    """The Serve deployment's class itself, constructed as Serve does, twice on one store."""
    from zayaserve.cluster.control.placement_controller import PlacementController

    cls: Any = PlacementController.func_or_class  # type: ignore[attr-defined]
    store = MemoryControllerStore()

    async def start() -> Any:
        c = cls.__new__(cls)
        await c.__init__(8, 2, 1, store=store)
        return c

    async def main() -> None:
        c = await start()
        for i in range(2):
            slot, hold = await c.claim(f"r{i}")
            await c.register(f"r{i}", slot, f"h:{i}", hold)
        first = await c.placement()
        op = await c.scale(expert_shards=3)
        assert op["created"], op
        c._tick.cancel()
        c2 = await start()  # the replica died; Serve started another
        again = await c2.placement()
        assert again.order > first.order
        assert again.epoch == first.epoch and again.addresses == first.addresses
        view = await c2.view()
        assert view["desired_shards"] == 3 and view["operation"] == op["operation"]["id"]
        got = await c2.operation(op["operation"]["id"])
        assert got is not None and "restarted" in got["history"][-1]
        c2._tick.cancel()

    asyncio.run(main())
