"""Token-budget scheduler: no prefill/decode phases, only sequences whose computed tokens catch
up to their known tokens. Running sequences go first (a decode is one token, a prefill a chunk),
then waiting ones while budget, sequence slots and KV blocks last. When blocks run out, the
most recently admitted running sequence is preempted and later recomputed."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from zayaserve.replicas.engine.block_pool import BlockPool, StateSlots
from zayaserve.replicas.engine.sequence import Sequence, Status
from zayaserve.replicas.kv_tiers.remote_tier import RemoteTier


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    enable_prefix_caching: bool = False


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step
    num_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    reset_state_slots: list[int] = field(default_factory=list)
    restore_states: list[tuple[int, int]] = field(default_factory=list)  # (slot, cached block)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockPool, slots: StateSlots) -> None:
        self.config = config
        self.blocks = blocks
        self.slots = slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0
        self.remote: RemoteTier | None = None  # L2 (Redis), set by the engine when configured

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._reserve(seq, n, out):
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
            hits = self._reuse_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve(seq, n, out):
                if hits:  # give the hits back; the sequence waits with nothing held
                    self.blocks.free(seq.block_table)
                    seq.block_table, seq.num_computed_tokens = [], 0
                break
            self.waiting.popleft()
            if seq.state_slot < 0:
                seq.state_slot = self.slots.allocate()
                if hits:
                    out.restore_states.append((seq.state_slot, hits[-1]))
                else:
                    out.reset_state_slots.append(seq.state_slot)
            if hits:
                seq.request.num_cached_tokens = max(seq.request.num_cached_tokens,
                                                    len(hits) * self.config.block_size)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return out

    def _reuse_cached_prefix(self, seq: Sequence) -> list[int]:
        """Points a fresh (or preempted) sequence at the cached blocks of its longest cached
        prefix, leaving at least one token to compute (its logits are needed)."""
        if (not self.config.enable_prefix_caching or seq.num_computed_tokens
                or seq.block_table or seq.request.prompt_logprobs is not None):
            return []  # prompt logprobs need every position's logits: no reuse (as vLLM)
        usable = (seq.num_tokens - 1) // self.config.block_size
        hits = self.blocks.lookup(seq.block_hashes[:usable])
        self.blocks.share(hits)
        self.prefix_hit_tokens += len(hits) * self.config.block_size  # L1 only
        if self.remote is not None and len(hits) < usable:
            hits = hits + self._fetch_remote(seq.block_hashes[len(hits):usable])
        if hits:
            seq.block_table = list(hits)
            seq.num_computed_tokens = len(hits) * self.config.block_size
        return hits

    def _fetch_remote(self, hashes: list[bytes]) -> list[int]:
        """Blocks of the longest prefix of `hashes` that L2 has, installed into fresh blocks
        (sealed into L1 too) — only as many as fit without preempting anyone."""
        assert self.remote is not None
        hashes = hashes[:max(0, self.blocks.num_free - 1)]
        payloads = self.remote.fetch(hashes)  # type: ignore[arg-type]
        blocks = self.blocks.allocate(len(payloads))
        for block, h, payload in zip(blocks, hashes, payloads, strict=False):
            self.remote.install(block, payload)
            self.blocks.seal(block, h)
        self.remote.stats.hit_tokens += len(blocks) * self.config.block_size
        return blocks

    def seal_computed(self, seq: Sequence, before: int) -> None:
        """Indexes the blocks this step completed (their snapshots were written with them)."""
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        for i in range(before // bs, seq.num_computed_tokens // bs):
            block, block_hash = seq.block_table[i], seq.block_hashes[i]
            if self.blocks.seal(block, block_hash) and self.remote is not None:
                self.remote.publish(block, block_hash)  # type: ignore[arg-type]

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Make room in `seq`'s block table for n more tokens; copy a shared block we'd write."""
        bs = self.config.block_size
        need = -(-(seq.num_computed_tokens + n) // bs) - len(seq.block_table)
        write_block = seq.num_computed_tokens // bs
        cow = (write_block < len(seq.block_table)
               and self.blocks.ref_count(seq.block_table[write_block]) > 1)
        if need + int(cow) > self.blocks.num_free:
            return False
        if cow:
            old = seq.block_table[write_block]
            (new,) = self.blocks.allocate(1)
            out.block_copies.append((old, new))
            self.blocks.free([old])
            seq.block_table[write_block] = new
        if need > 0:
            seq.block_table.extend(self.blocks.allocate(need))
        return True

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        if seq.state_slot >= 0:
            self.slots.free(seq.state_slot)
            seq.state_slot = -1

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Drop the sequence's cache; it will be recomputed from its known tokens."""
        self._release(seq)
        seq.num_computed_tokens = 0
        self.add(seq, front=True)
        out.num_preempted += 1
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED
