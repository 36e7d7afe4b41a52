"""Token-budget scheduler: no prefill/decode phases, only sequences whose computed tokens catch
up to their known tokens. Running sequences go first (a decode is one token, a prefill a chunk),
then waiting ones while budget, sequence slots and KV blocks last. When blocks run out, the
most recently admitted running sequence is preempted and later recomputed.

A step is `schedule()` -> the model runs -> `update_from_output()`, which owns everything after
the forward: computed-token counts, sealing, prompt logprobs, forks, appending, stop checks,
finishing by token ids and limits, and the step's `TokenRecord`s for the output processor
(which owns the text and stop strings). What each sequence holds in the cache is the
`KVManager`'s business."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from zayaserve.replicas.engine.block_pool import BlockPool, StateSlots
from zayaserve.replicas.engine.kv_manager import CacheOps, KVManager
from zayaserve.replicas.engine.output_processor import TokenRecord
from zayaserve.replicas.engine.outputs import Logprob
from zayaserve.replicas.engine.sampler import SampledToken
from zayaserve.replicas.engine.sequence import Request, Sequence, Status
from zayaserve.replicas.engine.stop_rules import check_token_stop, out_of_room, runs_ahead

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    enable_prefix_caching: bool = False
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 1 << 30


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step
    num_tokens: int


@dataclass(slots=True)
class SchedulerOutput(CacheOps):
    chunks: list[ScheduledChunk] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockPool, slots: StateSlots) -> None:
        self.config = config
        self.kv = KVManager(blocks, slots, config.block_size, config.enable_prefix_caching)
        self.blocks, self.slots = blocks, slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.fetching: list[Sequence] = []  # waiting for L2 blocks; admitted when they arrive
        self.num_preemptions = 0
        # Makes the child sequence of an n > 1 request (the engine's, which owns seeds and
        # hashers): (request, completion index, token ids) -> Sequence.
        self.spawn: Callable[[Request, int, list[int]], Sequence] | None = None

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        for seq in reversed(self.kv.poll_fetches(self.fetching)):
            self.fetching.remove(seq)
            self.add(seq, front=True)
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.reserve(seq, n, out):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
            i += 1

        # Admit waiting sequences only when nothing was preempted: a preemption means memory
        # is short, and admitting more would only thrash.
        while (self.waiting and budget > 0 and out.num_preempted == 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            if seq.state_slot < 0 and self.slots.num_free == 0:
                break
            hits = self.kv.reuse_cached_prefix(seq)
            if hits is None:  # its prefix is being fetched from L2: others go first
                self.waiting.popleft()
                seq.status = Status.FETCHING
                self.fetching.append(seq)
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.reserve(seq, n, out):
                if hits:  # give the hits back; the sequence waits with nothing held
                    self.kv.give_back_prefix(seq)
                break
            self.waiting.popleft()
            self.kv.assign_state_slot(seq, hits, out)
            seq.status = Status.RUNNING
            seq.request.timeline.on_scheduled()
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return out

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """Async scheduling: the next step, chosen while `prev` is still running, or None
        when it must wait for `prev`'s tokens. It only ever continues decodes: every sequence
        of `prev` samples a token and needs nothing of it before the next forward (see
        `runs_ahead`), none waits to be admitted, and the next token's blocks are free (no
        preemption). A sequence that `prev` certainly ends (its length) is left out; one that
        `prev` ends otherwise (eos, a stop) computes one token that is then dropped."""
        live = [c for c in prev.chunks if c.seq.status is not Status.FINISHED]
        if self.waiting or self.fetching or len(live) != len(self.running):
            return None
        bs, out = self.config.block_size, SchedulerOutput()
        new_blocks: list[int] = []  # per chunk: blocks its next position needs
        for c in live:
            seq = c.seq
            if (seq.status is not Status.RUNNING or c.start + c.num_tokens != seq.num_tokens
                    or not runs_ahead(seq)):
                return None
            if out_of_room(seq, self.config.max_model_len, pending=1):
                continue  # the token being sampled is its last
            end = c.start + c.num_tokens  # the position the next step computes
            new_blocks.append(max(0, end // bs + 1 - len(seq.block_table)))
            out.chunks.append(ScheduledChunk(seq, end, 1))
        if (not out.chunks or sum(new_blocks) > self.blocks.num_free
                or len(out.chunks) > self.config.max_num_batched_tokens):
            return None
        for chunk, n in zip(out.chunks, new_blocks, strict=True):
            chunk.seq.block_table.extend(self.blocks.allocate(n))
        return out

    def _release(self, seq: Sequence) -> None:
        self.kv.release(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Drop the sequence's cache; it will be recomputed from its known tokens."""
        self._release(seq)
        seq.num_computed_tokens = 0
        self.add(seq, front=True)
        out.num_preempted += 1
        self.num_preemptions += 1
        seq.request.timeline.on_preempted()

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.FETCHING:
            self.fetching.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    # ---- after the forward ----------------------------------------------------------------

    def update_from_output(self, sched: SchedulerOutput, sampled: SampledStep
                           ) -> list[TokenRecord]:
        """Applies a step's results: one TokenRecord per sequence that got a token, for the
        output processor. A sequence that finished since the step was scheduled (async
        scheduling, or a stop string heard late) is skipped."""
        if any(c.seq.status is Status.FINISHED for c in sched.chunks):
            sched = SchedulerOutput(chunks=[c for c in sched.chunks
                                            if c.seq.status is not Status.FINISHED])
            sampled = SampledStep([t for t in sampled.tokens
                                   if t[0].status is not Status.FINISHED],
                                  sampled.prompt_logprobs)
        for c in sched.chunks:
            if c.start < c.seq.prompt_len:
                c.seq.request.timeline.on_prefill_chunk(c.start, c.num_tokens)
            c.seq.num_computed_tokens += c.num_tokens
            self.kv.seal_computed(c.seq, c.start)
        for req, entries in sampled.prompt_logprobs:
            assert req.prompt_logprobs is not None
            req.prompt_logprobs.extend(entries)
        # Children fork from the parent's state before anyone appends a token.
        seqs = [self._fork(seq, child, seed) if child >= 0 else seq
                for seq, child, seed, _ in sampled.tokens]
        eos, max_len = self.config.eos_token_ids, self.config.max_model_len
        records = []
        for seq, (_, _, _, tok) in zip(seqs, sampled.tokens, strict=True):
            seq.append(tok.token_id, tok.logprob, tok.logprobs)
            by_token = check_token_stop(seq, tok.token_id, eos, max_len)
            if seq.finish_reason is not None:
                self.finish(seq)
            seq.request.timeline.on_tokens()
            records.append(TokenRecord(
                seq, tok.token_id, tok.logprobs if seq.logprobs is not None else None,
                seq.cumulative_logprob, seq.finish_reason, seq.stop_reason, by_token))
        for seq, child, _, _ in sampled.tokens:
            if child < 0:
                seq.forks_pending = 0
        return records

    def _fork(self, parent: Sequence, index: int, seed: int) -> Sequence:
        """A child of an n > 1 request: shares the parent's prompt blocks and copies its CCA
        state, so the prompt is prefilled once (or, with no room now, recomputes later)."""
        assert self.spawn is not None, "forks need the engine's spawn"
        child = self.spawn(parent.request, index, list(parent.token_ids))
        child.seed = seed
        if (parent.status is Status.RUNNING and len(self.running) < self.config.max_num_seqs
                and self.kv.fork(parent, child)):
            child.status = Status.RUNNING
            self.running.append(child)
        else:
            self.add(child)
        return child


class SampledStep(NamedTuple):
    """What a step's logits gave: the token of each sampled row — (sequence, child index or
    -1 for the sequence itself, the seed that drew it, the token) — and each request's
    new prompt logprobs."""

    tokens: list[tuple[Sequence, int, int, SampledToken]]
    prompt_logprobs: list[tuple[Request, list[dict[int, Logprob] | None]]]
