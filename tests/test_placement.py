"""Placement math and the placement map as data."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from zayaserve.router.placement import PlacementError, PlacementMap, compute_placement


def _is_cyclic_run(experts: list[int], num_experts: int) -> bool:
    """True when the experts are one contiguous run modulo num_experts."""
    if len(experts) in (0, num_experts):
        return True
    held = set(experts)
    starts = [e for e in held if (e - 1) % num_experts not in held]
    return len(starts) == 1


@pytest.mark.parametrize("num_experts", [8, 16, 64])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 5])
@pytest.mark.parametrize("replication", [1, 2, 3])
def test_every_expert_on_r_distinct_shards_balanced(
    num_experts: int, num_shards: int, replication: int
) -> None:
    shards = [f"s{i}" for i in range(num_shards)]
    if replication > num_shards:
        with pytest.raises(PlacementError, match="replication"):
            compute_placement(num_experts, shards, replication)
        return
    assignment = compute_placement(num_experts, shards, replication)
    assert list(assignment) == shards
    holders = Counter(e for experts in assignment.values() for e in set(experts))
    assert holders == dict.fromkeys(range(num_experts), replication)  # R distinct shards each
    for experts in assignment.values():
        assert len(experts) == len(set(experts))  # never two copies on one shard
        assert _is_cyclic_run(experts, num_experts)
    loads = [len(experts) for experts in assignment.values()]
    # The bound: shard loads differ by at most one expert, whatever E, M and R.
    assert max(loads) - min(loads) <= 1
    assert sum(loads) == num_experts * replication


def test_plain_split_is_contiguous_groups() -> None:
    assert compute_placement(16, ["a", "b"]) == {"a": list(range(8)), "b": list(range(8, 16))}
    assert compute_placement(8, ["a", "b", "c"]) == {"a": [0, 1, 2], "b": [3, 4, 5], "c": [6, 7]}


def test_more_shards_than_copies_leaves_spares() -> None:
    assignment = compute_placement(2, ["a", "b", "c"], 1)
    assert assignment == {"a": [0], "b": [1], "c": []}


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((8, [], 1), "shard_ids"),
        ((8, ["a", "a"], 1), "shard_ids"),
        ((8, ["a", "b"], 3), "replication"),
        ((8, ["a", "b"], 0), "replication"),
        ((0, ["a"], 1), "num_experts"),
    ],
)
def test_impossible_requests_name_the_field(args: tuple, field: str) -> None:
    with pytest.raises(PlacementError, match=f"^{field}:"):
        compute_placement(*args)


def test_map_queries() -> None:
    pm = PlacementMap(7, 5, {0: ("a",), 1: ("a",), 2: ("a", "b"), 3: ("b",)},
                      {"a": "h:1", "b": "h:2"})
    assert pm.version == 7
    assert pm.shards_for(layer=3, expert=2) == ("a", "b")  # listed order = preference
    assert pm.shards_for(layer=0, expert=4) == ()  # unplaced: the router waits for a newer map


def test_map_is_validated_and_read_only() -> None:
    with pytest.raises(PlacementError, match="addresses"):
        PlacementMap(1, 4, {0: ("a",)}, {})
    with pytest.raises(PlacementError, match="replicas: expert 4 out of range"):
        PlacementMap(1, 4, {4: ("a",)}, {"a": "h:1"})
    with pytest.raises(PlacementError, match=r"replicas\[0\]: shard listed twice"):
        PlacementMap(1, 4, {0: ("a", "a")}, {"a": "h:1"})
    with pytest.raises(PlacementError, match="num_experts"):
        PlacementMap(1, 0, {})
    none_yet = PlacementMap(-1, 4, {})  # "nothing published yet"
    assert all(none_yet.shards_for(0, e) == () for e in range(4))
    pm = PlacementMap(1, 4, {e: ("a",) for e in range(4)}, {"a": "h:1", "b": "h:2"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        pm.version = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        pm.replicas[0] = ("b",)  # type: ignore[index]
