"""The token-budget Scheduler, driven directly with real Request and Sequence objects (no
model): budgets, chunking, ordering, block accounting, finishing, L2 fetches, micro-batches
(preemption and copy-on-write: test_scheduler_preemption.py)."""

from __future__ import annotations

from typing import Any

from scheduler_helpers import (
    assert_all_free,
    ceil_div,
    check_accounting,
    complete_step,
    make_scheduler,
    make_seq,
)

from zayaserve.replicas.engine.block_pool import BlockPool, StateSlots
from zayaserve.replicas.engine.scheduler import Scheduler, SchedulerConfig
from zayaserve.replicas.engine.sequence import Status

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
