"""The placement controller's logic with simulated shards: slots claimed and re-taken, epochs
changed in two phases (routing never names a shard for an expert it has not loaded), resize
operations (idempotent, 409 on conflict, a scale-down that survives Serve removing any replica),
EPLB rebalances and the autoscaler's decisions becoming operations."""

from __future__ import annotations

import random

import pytest

from zayaserve.cluster.control.controller_state import ControllerState
from zayaserve.cluster.control.elastic_config import AutoscalingConfig, EplbConfig
from zayaserve.cluster.control.placement_state import ExpertPlacement
from zayaserve.cluster.control.scale_ops import ScaleConflict, ScaleError
from zayaserve.replicas.cluster_messages import ShardReport, WorkerReport
from zayaserve.replicas.engine.engine_stats import EngineStats


class Sim:
    """Shard replicas that load what they are told at their next heartbeat, and a clock."""

    def __init__(self, state: ControllerState) -> None:
        self.state, self.now, self.n = state, 0.0, 0
        self.shards: dict[str, tuple[str, set[int]]] = {}  # replica -> (slot, held)
        # Crashed replicas stay routed until their heartbeats are missed (the token router
        # retries their calls elsewhere meanwhile): what they held, by slot.
        self.dead: dict[str, set[int]] = {}

    def start(self) -> str:
        self.n += 1
        replica = f"r{self.n}"
        slot, hold = self.state.placement.claim(replica, self.now)
        self.shards[replica] = (slot, set(hold))
        self.state.placement.register(replica, slot, f"h:{self.n}", hold, self.now)
        return replica

    def step(self, dt: float = 0.5, tokens: dict[str, dict[tuple[int, int], int]] | None = None,
             queue_rows: int = 0) -> None:
        self.now += dt
        for replica, (slot, held) in list(self.shards.items()):
            report = ShardReport(tuple(sorted(held)), queue_rows,
                                 tokens=(tokens or {}).get(slot, {}))
            answer = self.state.heartbeat(replica, slot, report, self.now)
            if answer.ok:
                held.clear()
                held.update(answer.hold)  # loaded by the next beat
        self.state.tick(self.now)
        self.check_routes()

    def stop(self, replica: str, graceful: bool = True) -> None:
        slot, held = self.shards.pop(replica)
        if graceful:
            self.state.placement.leave(replica, slot, self.now)
        else:
            self.dead[slot] = held

    def check_routes(self) -> None:
        """The invariant: a route names only a live shard that holds the expert."""
        self.state.placement.refresh(self.now)
        m = self.state.placement.update(generation=1)
        held_by_slot = {**self.dead, **{slot: held for slot, held in self.shards.values()}}
        for expert, slots in m.replicas.items():
            for slot in slots:
                assert slot in m.addresses, (expert, slot)
                assert expert in held_by_slot.get(slot, set()), (expert, slot, m)

    def routed(self) -> dict[int, list[str]]:
        self.state.placement.refresh(self.now)
        return self.state.placement.routing()

    def run_until(self, check, steps: int = 100) -> None:  # type: ignore[no-untyped-def]
        for _ in range(steps):
            if check():
                return
            self.step()
        raise AssertionError("condition not reached")


def test_initial_slots_cover_every_expert_and_restart_retakes_a_slot() -> None:
    st = ControllerState(num_experts=8, num_shards=4, replication=2, heartbeat_timeout_s=2)
    assert sorted(e for x in st.placement.committed.values() for e in x) == sorted(
        list(range(8)) * 2)
    sim = Sim(st)
    replicas = [sim.start() for _ in range(4)]
    sim.step()
    assert all(len(r) == 2 for r in sim.routed().values())
    slot, held = sim.shards[replicas[0]]
    sim.stop(replicas[0], graceful=False)  # a crash: silent
    for _ in range(6):
        sim.step()
    assert st.placement.slots[slot].state() == "vacant"
    assert all(len(r) >= 1 for r in sim.routed().values())  # replication 2: still covered
    epoch = st.placement.epoch
    new = sim.start()
    assert sim.shards[new] == (slot, held)  # took over the vacant slot and its experts
    sim.step()
    assert all(len(r) == 2 for r in sim.routed().values()) and st.placement.epoch == epoch


def test_a_joining_shard_commits_a_new_epoch_only_once_loaded() -> None:
    st = ControllerState(num_experts=8, num_shards=2, replication=1, grace_s=2)
    sim = Sim(st)
    for _ in range(2):
        sim.start()
    sim.step()
    epoch = st.placement.epoch
    op, created = st.ops.start(3, None, sim.now, 0.0)
    assert created and op["phase"] == "preparing" and st.desired.shards == 3
    # Serve starts the third replica: it claims a new slot and is planned in, not yet routed.
    slot, hold = st.placement.claim("late", sim.now)
    assert slot == "shard-2" and hold and st.placement.pending is not None
    assert st.placement.epoch == epoch
    st.placement.register("late", slot, "h:late", [], sim.now)  # port open, nothing loaded
    sim.shards["late"] = (slot, set())
    sim.step()  # loads at this heartbeat; the commit follows once every slot reports it
    sim.run_until(lambda: st.placement.epoch == epoch + 1)
    assert any(slot in r for r in sim.routed().values())
    assert st.ops.get(op["id"])["phase"] in ("committing", "done")
    sim.run_until(lambda: st.ops.get(op["id"])["phase"] == "done")
    # After the grace, every slot holds exactly its committed experts.
    for replica, (s, held) in sim.shards.items():
        assert held == set(st.placement.committed[s]), replica
    assert sorted(len(x) for x in st.placement.committed.values()) == [2, 3, 3]


@pytest.mark.parametrize("seed", range(6))
def test_scale_down_survives_serve_removing_any_replica(seed: int) -> None:
    rng = random.Random(seed)
    st = ControllerState(num_experts=8, num_shards=3, replication=1, grace_s=1)
    sim = Sim(st)
    for _ in range(3):
        sim.start()
    sim.step()
    op, _ = st.ops.start(2, None, sim.now, 0.0)
    assert st.desired.shards == 3  # not lowered before every expert has a second copy
    sim.run_until(lambda: st.desired.shards == 2)
    assert all(len(r) >= 2 for r in sim.routed().values())
    sim.stop(rng.choice(list(sim.shards)), graceful=rng.random() < 0.7)  # Serve's pick
    for _ in range(60):
        sim.step()
        assert all(sim.routed()[e] for e in range(8)), sim.routed()  # never an expert unserved
        if st.ops.get(op["id"])["phase"] == "done":
            break
    assert st.ops.get(op["id"])["phase"] == "done"
    assert len(st.placement.committed) == 2
    assert all(len(r) == 1 for r in sim.routed().values())  # back to replication 1


def test_operations_are_idempotent_conflict_and_bounded() -> None:
    st = ControllerState(num_experts=4, num_shards=2, replication=1,
                         autoscaling=AutoscalingConfig(expert_shards={"min": 1, "max": 4}))
    sim = Sim(st)
    sim.start()
    sim.start()
    op, created = st.ops.start(3, None, 0, 0)
    again, created_again = st.ops.start(3, None, 0, 0)
    assert created and not created_again and again["id"] == op["id"]
    with pytest.raises(ScaleConflict) as conflict:
        st.ops.start(2, None, 0, 0)
    assert conflict.value.operation["id"] == op["id"]
    with pytest.raises(ScaleError, match=r"expert_shards: must be in \[1, 4\], got 9"):
        st.ops.start(9, None, 0, 0)
    with pytest.raises(ScaleError, match="attention_workers"):
        st.ops.start(None, 0, 0, 0)
    st.ops.timeout_s = 0
    st.ops.current.deadline = -1  # type: ignore[union-attr]
    st.ops.advance(1.0)
    failed = st.ops.get(op["id"])
    assert failed["phase"] == "failed" and "timed out" in failed["error"]
    assert st.desired.shards == 2  # Serve is no longer asked for the shard that never came
    assert st.ops.start(2, None, 2, 0)[1]  # the next one may start


def test_no_shards_refuses_a_shard_resize_but_scales_workers() -> None:
    st = ControllerState(num_experts=4, num_shards=0, replication=1)
    with pytest.raises(ScaleError, match="expert_shards"):
        st.ops.start(2, None, 0, 0)
    op, _ = st.ops.start(None, 2, 0, 0)
    assert st.desired.workers == 2 and op["phase"] == "preparing"
    st.report_worker("w1", WorkerReport(EngineStats(), 0), 1)
    st.report_worker("w2", WorkerReport(EngineStats(), 0), 1)
    st.tick(1)
    assert st.ops.get(op["id"])["phase"] == "done"


def test_a_worker_scale_down_is_done_once_serve_is_asked() -> None:
    """The removed worker drains on Serve's side and reports until it stops: the operation
    does not wait for it (it would hold the autoscaler and resizes by hand for the drain)."""
    st = ControllerState(num_experts=4, num_shards=0, replication=1, attention_workers=2)
    st.report_worker("w1", WorkerReport(EngineStats(), 0), 0)
    st.report_worker("w2", WorkerReport(EngineStats(num_requests_running=3), 0), 0)
    op, _ = st.ops.start(None, 1, 0, 0)
    assert st.desired.workers == 1 and st.ops.get(op["id"])["phase"] == "done"  # type: ignore
    assert st.live_workers(0) == 2  # still draining


def test_eplb_replicates_hot_experts_and_balances() -> None:
    st = ControllerState(num_experts=8, num_shards=4, replication=1, grace_s=1,
                         eplb=EplbConfig(enabled=True, interval_s=5, redundant_experts=4,
                                         window_s=2))
    sim = Sim(st)
    for _ in range(4):
        sim.start()
    zipf = [1000 / (k + 1) for k in range(8)]
    counts: dict[int, float] = dict.fromkeys(range(8), 0.0)

    def tokens() -> dict[str, dict[tuple[int, int], int]]:
        # Each holder of an expert serves an equal part of its tokens (cumulative counts).
        out: dict[str, dict[tuple[int, int], int]] = {}
        routes = sim.routed()
        for e in range(8):
            counts[e] += zipf[e] * 0.5
            for slot in routes[e]:
                out.setdefault(slot, {})[(0, e)] = int(counts[e] / len(routes[e]))
        return out

    def balance() -> float:
        b = st.view(sim.now)["balancedness"]
        return 0.0 if b is None else float(b)

    for _ in range(6):
        sim.step(tokens=tokens())
    before = balance()
    for _ in range(80):
        sim.step(tokens=tokens())
    assert st.rebalances >= 1 and st.placement.epoch > 1
    assert before < 0.8 and balance() >= 0.9, (before, balance())
    assert len(sim.routed()[0]) >= 2  # the hottest expert got replicas


def test_autoscaler_decisions_become_operations() -> None:
    cfg = AutoscalingConfig(enabled=True,
                            attention_workers={"min": 1, "max": 3, "upscale_delay_s": 1,
                                               "downscale_delay_s": 1},
                            expert_shards={"min": 1, "max": 3, "upscale_delay_s": 1,
                                           "downscale_delay_s": 1,
                                           "target_queue_per_shard": 8})
    st = ControllerState(num_experts=4, num_shards=1, replication=1, autoscaling=cfg)
    sim = Sim(st)
    sim.start()
    for _ in range(6):
        busy = EngineStats(num_requests_waiting=20, num_requests_running=4,
                           kv_blocks_total=10, kv_blocks_free=5)
        st.report_worker("w1", WorkerReport(busy, 0), sim.now)
        sim.step(queue_rows=40)
    assert st.desired.workers > 1 and st.desired.shards > 1, st.last_decision
    assert st.ops.current is not None
    assert "attention_workers: waiting" in st.ops.current.reason  # the operation says why
    assert st.ops.get(st.ops.current.id)["reason"].startswith("autoscaler: ")  # type: ignore
    reasons = st.view(sim.now)["autoscaler"]
    assert any(r.startswith("attention_workers: waiting") for r in reasons), reasons


def test_placement_view_shows_shard_states_and_held_experts() -> None:
    st = ControllerState(num_experts=4, num_shards=2, replication=1)
    sim = Sim(st)
    sim.start()
    st.placement.claim("slow", sim.now)
    view = st.view(sim.now)
    assert [s["state"] for s in view["shards"]] == ["serving", "starting"]
    assert view["epoch"] == 1 and view["desired_shards"] == 2
    assert view["shards"][0]["held"] == view["shards"][0]["experts"]


def test_plan_moves_few_experts_when_a_shard_joins() -> None:
    p = ExpertPlacement(num_experts=16, num_shards=4, replication=1)
    before = {s: set(x) for s, x in p.committed.items()}
    plan = p.plan([*p.committed, "shard-new"], 1, False)
    moved = sum(len(set(x) - before.get(s, set())) for s, x in plan.items())
    assert moved <= 4 and sorted(e for x in plan.values() for e in x) == list(range(16))
