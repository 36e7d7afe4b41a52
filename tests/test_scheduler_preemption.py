"""The Scheduler when blocks run out: preemption (who, when, requeued where) and copy-on-write
of shared blocks after forks, with real Request and Sequence objects (no model)."""

from __future__ import annotations

from scheduler_helpers import (
    assert_all_free,
    check_accounting,
    complete_step,
    make_scheduler,
    make_seq,
)

from zayaserve.replicas.engine.scheduler import Scheduler, SchedulerConfig
from zayaserve.replicas.engine.sequence import Sequence, Status

# ---- Scheduler ---------------------------------------------------------------------------


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
