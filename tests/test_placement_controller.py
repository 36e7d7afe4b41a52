"""The placement controller's state machine: slots claimed, vacated on missed heartbeats,
re-taken by a restarted replica, and a version that moves with every change."""

from __future__ import annotations

import pytest

from zayaserve.cluster.placement_controller import PlacementState


def test_slots_cover_every_expert_with_replication() -> None:
    st = PlacementState(num_experts=8, num_shards=4, replication=2)
    held = [e for experts in st.assignment.values() for e in experts]
    assert sorted(held) == sorted(list(range(8)) * 2)
    for slot, experts in st.assignment.items():
        assert len(set(experts)) == len(experts), slot


def test_claim_register_and_map() -> None:
    st = PlacementState(num_experts=4, num_shards=2, replication=1, heartbeat_timeout_s=5)
    a_slot, a_experts = st.claim("a", now=0)
    b_slot, b_experts = st.claim("b", now=0)
    assert a_slot != b_slot and sorted(a_experts + b_experts) == [0, 1, 2, 3]
    assert st.claim("a", now=0) == (a_slot, a_experts)  # idempotent per replica
    with pytest.raises(RuntimeError, match="expert_shards"):
        st.claim("c", now=0)
    v0 = st.placement(now=0)["version"]
    st.register("a", a_slot, "10.0.0.1:1", now=0)
    m = st.placement(now=0)
    assert m["version"] > v0 and m["addresses"] == {a_slot: "10.0.0.1:1"}
    assert all(m["replicas"][e] == [a_slot] for e in a_experts)
    assert all(m["replicas"][e] == [] for e in b_experts)  # registered only when ready


def test_missed_heartbeats_vacate_and_restart_retakes() -> None:
    st = PlacementState(num_experts=4, num_shards=2, replication=1, heartbeat_timeout_s=5)
    a_slot, a_experts = st.claim("a", now=0)
    st.register("a", a_slot, "h:1", now=0)
    b_slot, _ = st.claim("b", now=0)
    st.register("b", b_slot, "h:2", now=0)
    assert st.heartbeat("a", a_slot, {"tokens": 3}, now=4)
    v = st.placement(now=4)["version"]
    m = st.placement(now=8)  # b silent for 8 s > 5: gone; a heard at 4
    assert m["version"] == v + 1 and b_slot not in m["addresses"]
    assert not st.heartbeat("b", b_slot, now=8)  # b learns its slot was given away
    slot, experts = st.claim("b2", now=8)  # the restarted replica takes the vacated experts
    assert slot == b_slot
    st.register("b2", slot, "h:3", now=8)
    assert st.placement(now=8)["addresses"][b_slot] == "h:3"


def test_stats_sum_workers_and_count_live_shards() -> None:
    st = PlacementState(num_experts=2, num_shards=1, replication=1)
    st.report_worker("w1", {"num_requests_running": 2, "note": "x"})
    st.report_worker("w2", {"num_requests_running": 3})
    s = st.stats()
    assert s["num_requests_running"] == 5 and s["expert_shards_live"] == 0


def _serving(st: PlacementState) -> list[str]:
    slots = []
    for i, replica in enumerate(("a", "b")):
        slot, _ = st.claim(replica, now=0)
        st.register(replica, slot, f"h:{i}", now=0)
        slots.append(slot)
    return slots


def test_view_shows_epoch_shard_states_load_and_balancedness() -> None:
    st = PlacementState(num_experts=4, num_shards=3, replication=1, heartbeat_timeout_s=30)
    a, b = _serving(st)
    c, _ = st.claim("c", now=0)  # claimed, still loading
    held = {slot: st.assignment[slot] for slot in (a, b)}
    # Each of a's experts takes 30 tokens per second (15 in each of two layers), each of b's
    # 10 (cumulative counts; the first heartbeat is the baseline).
    for t in range(1, 6):
        st.heartbeat("a", a, {"tokens": {f"{layer}:{e}": 15 * t for e in held[a]
                                         for layer in (0, 1)}}, now=t)
        st.heartbeat("b", b, {"tokens": {f"0:{e}": 10 * t for e in held[b]}}, now=t)
    view = st.view(now=5)
    assert view["epoch"] == st.placement(now=5)["version"] and view["epoch"] >= 2
    assert [(s["id"], s["state"]) for s in view["shards"]] == [
        (a, "serving"), (b, "serving"), (c, "starting")]
    assert view["shards"][2]["address"] is None and view["shards"][0]["address"] == "h:0"
    load = view["expert_load"]
    assert all(load[e] == pytest.approx(30) for e in held[a]), load
    assert all(load[e] == pytest.approx(10) for e in held[b]), load
    assert all(load[e] == 0 for e in st.assignment[c]), load  # not serving: no tokens
    # The two live shards' load per tick; balancedness is their mean over their max.
    shard_a, shard_b = 30 * len(held[a]), 10 * len(held[b])
    assert view["balancedness"] == pytest.approx((shard_a + shard_b) / 2 / max(shard_a, shard_b))


def test_a_restarted_replica_starts_a_new_baseline_and_load_decays() -> None:
    st = PlacementState(num_experts=2, num_shards=1, replication=1, heartbeat_timeout_s=30)
    slot, _ = st.claim("a", now=0)
    st.register("a", slot, "h:0", now=0)
    st.heartbeat("a", slot, {"tokens": {"0:0": 7}}, now=0)  # the baseline
    st.heartbeat("a", slot, {"tokens": {"0:0": 107}}, now=1)
    first = st.view(now=1)["expert_load"][0]
    assert first == pytest.approx(100)
    st.register("a2", slot, "h:1", now=1)  # the same slot, a new replica: its counts restart
    st.heartbeat("a2", slot, {"tokens": {"0:0": 5}}, now=2)  # its baseline: not -102
    assert st.view(now=2)["expert_load"][0] == 0  # the old replica's rate went with it
    st.heartbeat("a2", slot, {"tokens": {"0:0": 55}}, now=3)
    assert st.view(now=3)["expert_load"][0] == pytest.approx(50)
    for t in range(4, 200):
        st.heartbeat("a2", slot, {"tokens": {"0:0": 55}}, now=t)
    assert st.view(now=200)["expert_load"][0] < 1  # idle: the average decays
