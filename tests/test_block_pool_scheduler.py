"""BlockPool, StateSlots and the token-budget Scheduler, driven directly with real Request and
Sequence objects (no model): budgets, chunking, ordering, block accounting, preemption and
copy-on-write."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from zayaserve.replicas.engine.block_pool import BlockPool, StateSlots
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from zayaserve.replicas.engine.sequence import Request, Sequence, Status

_ids = itertools.count()


def make_seq(num_prompt_tokens: int) -> Sequence:
    seq_id = next(_ids)
    prompt = [10 + i for i in range(num_prompt_tokens)]
    req = Request(f"r{seq_id}", None, prompt, SamplingParams(), arrival=seq_id)
    seq = Sequence(seq_id, req, 0, list(prompt), seq_id)
    req.seqs.append(seq)
    return seq


def make_scheduler(
    num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 64
) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, block_size),
                     BlockPool(num_blocks), StateSlots(max_num_seqs))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def complete_step(out: SchedulerOutput) -> None:
    """What the engine does after the forward: count the computed tokens and, for every
    sequence that caught up with its known tokens, append one sampled token."""
    for c in out.chunks:
        assert c.start == c.seq.num_computed_tokens
        c.seq.num_computed_tokens += c.num_tokens
        if c.seq.num_computed_tokens == c.seq.num_tokens:
            c.seq.token_ids.append(7)


def check_accounting(sched: Scheduler) -> None:
    """Every block held by a live sequence is counted once per holder; the rest are free."""
    refs: dict[int, int] = {}
    for seq in sched.running:
        assert seq.status is Status.RUNNING
        assert len(seq.block_table) == ceil_div(seq.num_computed_tokens, sched.config.block_size)
        for b in seq.block_table:
            refs[b] = refs.get(b, 0) + 1
    for seq in sched.waiting:
        assert seq.status is Status.WAITING and seq.block_table == [] and seq.state_slot < 0
    for b in range(sched.blocks.num_blocks):
        assert sched.blocks.ref_count(b) == refs.get(b, 0), b
    assert sched.blocks.num_free == sched.blocks.num_blocks - len(refs)
    slots = [s.state_slot for s in sched.running]
    assert len(set(slots)) == len(slots) and all(s >= 0 for s in slots)
    assert sched.slots.num_free == sched.slots.num_slots - len(slots)


def assert_all_free(sched: Scheduler) -> None:
    assert sched.blocks.num_free == sched.blocks.num_blocks
    assert all(sched.blocks.ref_count(b) == 0 for b in range(sched.blocks.num_blocks))
    assert sched.slots.num_free == sched.slots.num_slots


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


# ---- Scheduler ---------------------------------------------------------------------------


def test_token_budget_is_respected_and_everything_completes() -> None:
    sched = make_scheduler(budget=10, max_num_seqs=4)
    seqs = [make_seq(n) for n in (23, 3, 17, 1, 9, 12)]
    for s in seqs:
        sched.add(s)
    target = {s.seq_id: s.num_tokens + 3 for s in seqs}  # prompt + 3 decoded tokens
    for _ in range(200):
        out = sched.schedule()
        assert 0 < out.num_tokens <= 10
        assert len({c.seq.seq_id for c in out.chunks}) == len(out.chunks)
        assert len(sched.running) <= 4
        complete_step(out)
        for s in list(sched.running):
            if s.num_tokens >= target[s.seq_id]:
                sched.finish(s)
        check_accounting(sched)
        if not (sched.waiting or sched.running):
            break
    assert not (sched.waiting or sched.running)
    assert all(s.status is Status.FINISHED and s.num_tokens == target[s.seq_id] for s in seqs)
    assert_all_free(sched)


def test_chunked_prefill_splits_a_long_prompt() -> None:
    sched = make_scheduler(budget=8, block_size=4)
    seq = make_seq(25)
    sched.add(seq)
    spans = []
    for _ in range(4):
        out = sched.schedule()
        (chunk,) = out.chunks
        spans.append((chunk.start, chunk.num_tokens))
        complete_step(out)
        assert len(seq.block_table) == ceil_div(seq.num_computed_tokens, 4)
    assert spans == [(0, 8), (8, 8), (16, 8), (24, 1)]
    assert seq.num_tokens == 26  # only the last chunk reached the end and sampled
    out = sched.schedule()
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(25, 1)]


def test_running_decodes_go_before_waiting_prefills() -> None:
    sched = make_scheduler(budget=6, block_size=4)
    a, b = make_seq(5), make_seq(3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # a takes 5, b gets the last token of budget
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(a, 5), (b, 1)]
    complete_step(out)
    late = make_seq(4)
    sched.add(late)
    out = sched.schedule()
    # a decodes (1), b continues its prefill (2), the newcomer gets what is left (3)
    assert [(c.seq, c.start, c.num_tokens) for c in out.chunks] == [
        (a, 5, 1), (b, 1, 2), (late, 0, 3)]
    complete_step(out)
    # With a budget too small for everyone, the running ones are served first.
    sched2 = make_scheduler(budget=2)
    x, y, z = make_seq(1), make_seq(1), make_seq(4)
    for s in (x, y):
        sched2.add(s)
    complete_step(sched2.schedule())
    sched2.add(z)
    out = sched2.schedule()
    assert [c.seq for c in out.chunks] == [x, y]
    assert list(sched2.waiting) == [z]


def test_max_num_seqs_is_respected() -> None:
    sched = make_scheduler(max_num_seqs=2, budget=100)
    seqs = [make_seq(3) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [c.seq for c in out.chunks] == seqs[:2]
    assert sched.running == seqs[:2] and list(sched.waiting) == seqs[2:]
    complete_step(out)
    out = sched.schedule()
    assert [c.seq for c in out.chunks] == seqs[:2]
    complete_step(out)
    sched.finish(seqs[0])
    assert seqs[0].status is Status.FINISHED
    out = sched.schedule()
    assert [c.seq for c in out.chunks] == [seqs[1], seqs[2]]
    assert len(sched.running) == 2
    complete_step(out)
    check_accounting(sched)


def test_blocks_reserved_are_ceil_of_tokens_over_block_size() -> None:
    for bs in (1, 3, 4, 16):
        sched = make_scheduler(block_size=bs, num_blocks=200, budget=7)
        seq = make_seq(30)
        sched.add(seq)
        while seq.num_tokens < 40:
            out = sched.schedule()
            (chunk,) = out.chunks
            assert len(seq.block_table) == ceil_div(chunk.start + chunk.num_tokens, bs)
            assert sched.blocks.num_free == 200 - len(seq.block_table)
            complete_step(out)
        sched.finish(seq)
        assert_all_free(sched)


def test_new_sequences_get_a_fresh_state_slot_reset() -> None:
    sched = make_scheduler(budget=100)
    a, b = make_seq(3), make_seq(3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert sorted(out.reset_state_slots) == sorted([a.state_slot, b.state_slot])
    assert a.state_slot != b.state_slot
    complete_step(out)
    out = sched.schedule()
    assert out.reset_state_slots == []  # running sequences keep their state


def _three_running_at_a_block_edge(
    last_len: int = 8, num_blocks: int = 6
) -> tuple[Scheduler, list[Sequence]]:
    """bs 4: sequences of 8, 8 and `last_len` tokens fill every block in one step, then each
    decode needs a new block."""
    sched = make_scheduler(num_blocks=num_blocks, block_size=4, budget=64, max_num_seqs=4)
    seqs = [make_seq(8), make_seq(8), make_seq(last_len)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [c.seq for c in out.chunks] == seqs
    assert sched.blocks.num_free == 0
    complete_step(out)
    return sched, seqs


def test_preemption_takes_the_most_recently_admitted_and_requeues_it_first() -> None:
    sched, (a, b, c) = _three_running_at_a_block_edge()
    newcomer = make_seq(1)
    sched.add(newcomer)
    c_slot = c.state_slot
    free_slots = sched.slots.num_free
    out = sched.schedule()
    # a needs a 3rd block: c (admitted last) goes; its 2 blocks cover a's and b's decodes.
    assert out.num_preempted == 1 and sched.num_preemptions == 1
    assert [(ch.seq, ch.start, ch.num_tokens) for ch in out.chunks] == [(a, 8, 1), (b, 8, 1)]
    assert sched.running == [a, b]
    assert list(sched.waiting) == [c, newcomer]  # preempted one at the FRONT
    assert c.status is Status.WAITING
    assert c.num_computed_tokens == 0 and c.block_table == [] and c.state_slot == -1
    assert c.num_tokens == 9  # its sampled token is kept and will be recomputed
    assert sched.slots.num_free == free_slots + 1
    assert c_slot not in (a.state_slot, b.state_slot)
    complete_step(out)
    check_accounting(sched)


def test_no_admission_in_a_step_with_a_preemption() -> None:
    # c holds 3 blocks; preempting it leaves one block free after a's and b's decodes.
    sched, (a, b, c) = _three_running_at_a_block_edge(last_len=12, num_blocks=7)
    # A budget of 4 leaves c a 2-token chunk (one block): it would fit, were it admitted.
    sched.config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=4, block_size=4)
    out = sched.schedule()
    assert out.num_preempted == 1
    assert [ch.seq for ch in out.chunks] == [a, b]
    assert sched.blocks.num_free == 1 and sched.slots.num_free > 0
    assert list(sched.waiting) == [c]
    complete_step(out)
    check_accounting(sched)
    out = sched.schedule()  # no preemption this time: c comes back, from position 0
    assert out.num_preempted == 0
    assert [(ch.seq, ch.start, ch.num_tokens) for ch in out.chunks] == [
        (a, 9, 1), (b, 9, 1), (c, 0, 2)]
    assert c.state_slot in out.reset_state_slots
    complete_step(out)
    check_accounting(sched)


def test_preempting_the_sequence_itself_when_nothing_else_can_go() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    seq = make_seq(8)
    sched.add(seq)
    complete_step(sched.schedule())
    held = sched.blocks.allocate(2)  # the free blocks, taken by someone outside
    waiting = make_seq(1)
    sched.add(waiting)
    out = sched.schedule()
    assert out.chunks == [] and out.num_preempted == 1
    assert list(sched.waiting) == [seq, waiting]
    assert seq.block_table == [] and seq.num_computed_tokens == 0 and seq.state_slot == -1
    sched.blocks.free(held)
    out = sched.schedule()  # recomputes all 9 known tokens, then admits the other
    assert [(c.seq, c.start, c.num_tokens) for c in out.chunks] == [(seq, 0, 9), (waiting, 0, 1)]
    assert seq.state_slot in out.reset_state_slots
    complete_step(out)
    check_accounting(sched)


def _fork(sched: Scheduler, parent: Sequence) -> Sequence:
    """What the engine does for n > 1: the child shares the parent's blocks."""
    child = make_seq(0)
    child.token_ids = list(parent.token_ids)
    child.num_computed_tokens = parent.num_computed_tokens
    sched.blocks.share(parent.block_table)
    child.block_table = list(parent.block_table)
    child.state_slot = sched.slots.allocate()
    child.status = Status.RUNNING
    sched.running.append(child)
    return child


def test_copy_on_write_into_a_shared_block() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, budget=64)
    parent = make_seq(6)
    sched.add(parent)
    out = sched.schedule()
    parent.num_computed_tokens += 6
    b0, b1 = parent.block_table
    child = _fork(sched, parent)
    parent.token_ids.append(7)
    child.token_ids.append(8)
    assert sched.blocks.ref_count(b0) == 2 and sched.blocks.ref_count(b1) == 2
    free_before = sched.blocks.num_free

    out = sched.schedule()
    # Both write position 6, inside the shared, half-full b1. The first writer copies it.
    assert [(c.seq, c.start, c.num_tokens) for c in out.chunks] == [(parent, 6, 1), (child, 6, 1)]
    assert len(out.block_copies) == 1
    src, dst = out.block_copies[0]
    assert src == b1 and dst not in (b0, b1)
    assert parent.block_table == [b0, dst]
    assert child.block_table == [b0, b1]  # the last holder writes in place
    assert sched.blocks.ref_count(b1) == 1 and sched.blocks.ref_count(dst) == 1
    assert sched.blocks.ref_count(b0) == 2  # untouched full block stays shared
    assert sched.blocks.num_free == free_before - 1
    complete_step(out)
    check_accounting(sched)
    sched.finish(parent)
    assert sched.blocks.ref_count(b0) == 1
    sched.finish(child)
    assert_all_free(sched)


def test_no_copy_when_the_shared_prefix_ends_on_a_block_edge() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, budget=64)
    parent = make_seq(8)
    sched.add(parent)
    sched.schedule()
    parent.num_computed_tokens = 8
    child = _fork(sched, parent)
    parent.token_ids.append(7)
    child.token_ids.append(8)
    out = sched.schedule()
    assert out.block_copies == []
    assert parent.block_table[:2] == child.block_table[:2]
    assert parent.block_table[2] != child.block_table[2]
    complete_step(out)
    check_accounting(sched)


def test_copy_on_write_without_a_free_block_preempts() -> None:
    sched = make_scheduler(num_blocks=2, block_size=4, budget=64)
    parent = make_seq(6)
    sched.add(parent)
    sched.schedule()
    parent.num_computed_tokens = 6
    child = _fork(sched, parent)
    parent.token_ids.append(7)
    child.token_ids.append(8)
    out = sched.schedule()
    # No free block to copy into: the child (last admitted) is preempted, which drops the
    # parent's block to a single holder, so it writes in place.
    assert out.num_preempted == 1 and out.block_copies == []
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(parent, 1)]
    assert list(sched.waiting) == [child] and child.block_table == []
    assert all(sched.blocks.ref_count(b) == 1 for b in parent.block_table)
    complete_step(out)
    check_accounting(sched)


def test_finish_releases_running_and_waiting_sequences() -> None:
    sched = make_scheduler(max_num_seqs=1, budget=64)
    a, b = make_seq(5), make_seq(5)
    sched.add(a)
    sched.add(b)
    complete_step(sched.schedule())
    assert sched.running == [a] and list(sched.waiting) == [b]
    sched.finish(b)
    sched.finish(a)
    assert a.status is b.status is Status.FINISHED
    assert not (sched.waiting or sched.running)
    assert a.block_table == [] and a.state_slot == -1
    assert_all_free(sched)


def test_l2_fetch_runs_off_the_schedule_and_admits_when_done() -> None:
    """A sequence whose prefix L2 may hold waits in a state of its own while the fetch runs on
    another thread; others keep being scheduled; once the blocks arrive it is admitted with
    them installed (the scheduler never blocks on Redis)."""
    import threading
    from types import SimpleNamespace

    release = threading.Event()
    installed: list[int] = []

    class SlowRemote:
        stats = SimpleNamespace(hit_tokens=0)

        def fetch(self, hashes: list[bytes], parent: object = None) -> list[str]:
            release.wait(10)
            return [f"payload-{i}" for i in range(len(hashes))]

        def install(self, block: int, payload: str) -> None:
            installed.append(block)

        def publish(self, block: int, block_hash: bytes, parent: object = None) -> None:
            pass

    sched = Scheduler(SchedulerConfig(8, 64, 4, enable_prefix_caching=True), BlockPool(64),
                      StateSlots(8))
    sched.kv.remote = SlowRemote()  # type: ignore[assignment]
    cached, other = make_seq(13), make_seq(3)  # other: too short for any full block
    cached.block_hashes = [bytes([i]) * 32 for i in range(3)]
    sched.add(cached)
    out = sched.schedule()
    assert cached.status is Status.FETCHING and not out.chunks
    sched.add(other)
    for _ in range(3):  # the fetch hangs, yet the other sequence runs
        out = sched.schedule()
        assert [c.seq for c in out.chunks] == [other]
        complete_step(out)
    release.set()
    cached.remote_fetch[1].result(10)  # the fetch is done; the next schedule admits it
    out = sched.schedule()
    admitted = [c for c in out.chunks if c.seq is cached]
    assert admitted and admitted[0].start == 12  # 3 blocks of 4 came from L2
    assert len(installed) == 3 and cached.request.num_cached_tokens == 12
    complete_step(out)
    check_accounting(sched)


def test_micro_batch_split_is_balanced_and_keeps_order() -> None:
    from types import SimpleNamespace

    from zayaserve.replicas.engine.runner import _split

    def chunks(*sizes: int) -> list[Any]:
        return [SimpleNamespace(num_tokens=n, i=i) for i, n in enumerate(sizes)]

    for sizes, parts in (((1,) * 10, 3), ((5, 1, 1, 1, 1, 1), 2), ((1, 1), 4), ((3,), 2),
                         ((2, 9, 1, 1, 7, 1), 4), ((1,) * 64, 8), ((100, 1, 1), 3)):
        groups = _split(chunks(*sizes), parts)  # type: ignore[arg-type]
        assert [c.i for g in groups for c in g] == list(range(len(sizes)))  # order, all
        assert 1 <= len(groups) <= min(parts, len(sizes)) and all(groups)
        tokens = [sum(c.num_tokens for c in g) for g in groups]
        assert max(tokens) - min(tokens) <= max(sizes)  # as even as the chunks allow
        if len(set(sizes)) == 1:
            assert len(groups) == min(parts, len(sizes))
