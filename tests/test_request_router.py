"""The prefix-aware router's table: longest remembered prefix wins among live candidates."""

from __future__ import annotations

from zayaserve.replicas.routing_stats import RoutingStats
from zayaserve.replicas.serve_request_router import PrefixTable, prompt_block_hashes


def test_block_hashes_are_chained_and_full_blocks_only() -> None:
    a = prompt_block_hashes(list(range(40)), 16)
    b = prompt_block_hashes(list(range(40)) + [7], 16)
    c = prompt_block_hashes([99] + list(range(1, 40)), 16)
    assert len(a) == 2 and a == b  # the partial tail is not hashed
    assert c[0] != a[0] and c[1] != a[1]  # an early change changes everything after it


def test_longest_prefix_among_candidates() -> None:
    table = PrefixTable()
    p = prompt_block_hashes(list(range(64)), 16)
    q = prompt_block_hashes(list(range(32)) + [5] * 32, 16)
    table.record(p, "w1")
    table.record(q, "w2")  # q shares p's first two blocks; w2 now owns those two
    # chained hashes: whoever owns the deepest matching block holds the whole prefix
    assert table.longest(p, {"w1", "w2"}) == ("w1", 4)
    assert table.longest(q, {"w1", "w2"}) == ("w2", 4)
    assert table.longest(p[:2], {"w1", "w2"}) == ("w2", 2)
    assert table.longest(p, {"w2"}) == ("w2", 2)  # only live candidates count
    assert table.longest(p, {"w3"}) == (None, 0)
    table.forget("w2")
    assert table.longest(p, {"w1", "w2"}) == ("w1", 4)
    # one owner per block: w1 also holds q's first two blocks, but the table no longer knows,
    # so q falls back to load-based routing (never to a dead replica)
    assert table.longest(q, {"w1", "w2"}) == (None, 0)


def test_table_is_bounded() -> None:
    table = PrefixTable(max_entries=3)
    table.record(prompt_block_hashes(list(range(80)), 16), "w")
    assert len(table._owner) == 3


def test_routing_stats_round_trip_through_serves_form() -> None:
    """The worker writes RoutingStats in Serve's dict-of-floats form; the request router reads
    it back. A worker with two RSA runs holding 8 calls weighs 6 more than Serve's queue says;
    a replica that has reported nothing weighs nothing extra."""
    sent = RoutingStats(rsa_calls=8, rsa_runs=2)
    form = sent.metrics()
    assert all(isinstance(v, float) for v in form.values())
    assert RoutingStats.from_metrics(form) == sent
    assert RoutingStats.from_metrics(form).extra_calls == 6
    assert RoutingStats.from_metrics(None).extra_calls == 0
    assert RoutingStats(rsa_calls=0, rsa_runs=1).extra_calls == 0  # a run between its rounds
