"""Maps are ordered by (generation, version): a worker adopts only a newer one, so an answer from
a controller replica being replaced, or one delayed in flight, never moves routing backwards;
the token router never routes by a map older than the one it holds."""

from __future__ import annotations

from zayaserve.replicas.attention_worker import PlacementHolder
from zayaserve.replicas.cluster_messages import PlacementUpdate
from zayaserve.router.placement import PlacementMap
from zayaserve.router.token_router import TokenRouter


def test_worker_refuses_an_older_map() -> None:
    def d(generation: int, version: int, address: str) -> PlacementUpdate:
        return PlacementUpdate(generation, version, epoch=1, num_experts=2,
                               replicas={0: ("s",), 1: ("s",)}, addresses={"s": address},
                               assignment={"s": (0, 1)})

    h = PlacementHolder(2)
    assert h.map.version == -1
    assert h.offer(d(1, 5, "a:5")) and h.map.addresses["s"] == "a:5"
    assert not h.offer(d(1, 4, "a:4")) and h.map.addresses["s"] == "a:5" and h.refused == 1
    assert not h.offer(d(1, 5, "a:5")) and h.refused == 1  # the same map: nothing to do
    assert h.offer(d(2, 6, "b:6")) and h.order == (2, 6)
    assert not h.offer(d(1, 9, "old:9"))  # the replaced controller's answer, late
    assert not h.offer(d(0, 7, "x"))  # generation 0: older than any later generation
    assert h.map.addresses["s"] == "b:6" and h.refused == 3


def test_token_router_never_routes_by_an_older_map() -> None:
    maps = {"now": PlacementMap(3, 2, {})}
    router = TokenRouter(lambda: maps["now"], 2)
    assert router._refresh().version == 3
    maps["now"] = PlacementMap(2, 2, {})
    assert router._refresh().version == 3 and router.stats.map_versions_seen == 1
    maps["now"] = PlacementMap(4, 2, {})
    assert router._refresh().version == 4 and router.stats.map_versions_seen == 2


def test_a_worker_holding_the_newest_map_is_answered_none() -> None:
    """Versioned distribution: the controller sends a map only to a worker that lacks it, and
    builds it once per version, however many workers ask."""
    from zayaserve.bench.control_plane import Simulation, _call

    sim = Simulation(workers=3, shards=2)
    ctl = sim.ctl
    first = _call(ctl.placement(None))
    assert first is not None and _call(ctl.placement(first.order)) is None
    assert _call(ctl.placement(None)) is first  # built once for this version
    assert _call(ctl.placement((first.generation, first.version - 1))) is first
    sim.start_shard("another")  # registering changes the map: a newer version is sent
    newer = _call(ctl.placement(first.order))
    assert newer is not None and newer.order > first.order
    sim.advance(2.0)
    assert all(known == _call(ctl.placement(None)).order for known in sim.known)
    sends = sim.map_sends
    sim.advance(2.0)
    assert sim.map_sends == sends  # steady state: nothing but "you have it"
