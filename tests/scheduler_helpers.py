"""What the block pool and scheduler tests share: real Request and Sequence objects, a small
scheduler, and the checks of its block and slot accounting."""

from __future__ import annotations

import itertools

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
