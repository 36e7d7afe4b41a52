"""BlockPool and StateSlots on their own: allocation, sharing, and what asserts."""

from __future__ import annotations

import pytest

from zayaserve.replicas.engine.block_pool import BlockPool, StateSlots

# ---- BlockPool ---------------------------------------------------------------------------


def test_block_pool_allocate_and_free() -> None:
    pool = BlockPool(6)
    a = pool.allocate(4)
    assert len(set(a)) == 4 and all(0 <= b < 6 for b in a)
    assert pool.num_free == 2
    assert all(pool.ref_count(b) == 1 for b in a)
    b = pool.allocate(2)
    assert not set(a) & set(b)
    assert pool.num_free == 0
    with pytest.raises(RuntimeError, match="KV blocks"):
        pool.allocate(1)
    pool.free(a[:2])
    assert pool.num_free == 2
    assert pool.ref_count(a[0]) == 0 and pool.ref_count(a[2]) == 1
    again = pool.allocate(2)
    assert set(again) == set(a[:2])
    pool.free(again + a[2:] + b)
    assert pool.num_free == 6
    assert pool.allocate(0) == []


def test_block_pool_sharing_keeps_block_until_last_holder_frees() -> None:
    pool = BlockPool(3)
    (blk,) = pool.allocate(1)
    pool.share([blk])
    pool.share([blk])
    assert pool.ref_count(blk) == 3
    pool.free([blk])
    pool.free([blk])
    assert pool.ref_count(blk) == 1 and pool.num_free == 2
    assert blk not in pool.allocate(2)
    pool.free([blk])
    assert pool.ref_count(blk) == 0 and pool.num_free == 1


def test_block_pool_double_free_and_sharing_a_free_block_assert() -> None:
    pool = BlockPool(2)
    (blk,) = pool.allocate(1)
    pool.free([blk])
    with pytest.raises(AssertionError, match="double free"):
        pool.free([blk])
    with pytest.raises(AssertionError, match="free block"):
        pool.share([blk])
    with pytest.raises(AssertionError, match="double free"):
        pool.free([1 - blk])  # never allocated at all
    assert pool.num_free == 2


def test_block_pool_rejects_empty_pool() -> None:
    with pytest.raises(ValueError, match="num_kv_blocks"):
        BlockPool(0)


# ---- StateSlots --------------------------------------------------------------------------


def test_state_slots_allocate_free() -> None:
    slots = StateSlots(3)
    got = [slots.allocate() for _ in range(3)]
    assert sorted(got) == [0, 1, 2]
    assert slots.num_free == 0
    slots.free(got[1])
    assert slots.num_free == 1
    assert slots.allocate() == got[1]
    for s in got:
        slots.free(s)
    assert slots.num_free == 3


def test_state_slots_double_free_asserts() -> None:
    """A slot freed twice would later be handed to two sequences, mixing their CCA states."""
    slots = StateSlots(2)
    s = slots.allocate()
    slots.free(s)
    with pytest.raises(AssertionError, match="double free"):
        slots.free(s)
    assert slots.num_free == 2
    assert sorted([slots.allocate(), slots.allocate()]) == [0, 1]
