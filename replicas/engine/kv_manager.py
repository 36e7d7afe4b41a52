"""The KV manager: everything a sequence holds in the cache. Block tables (with copy-on-write
of shared blocks), CCA state slots, prefix lookup in L1 and L2, sealing finished blocks, and
forks of n > 1 requests. The scheduler decides who runs; this decides what they hold."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from zayaserve.replicas.engine.block_pool import BlockPool, StateSlots
from zayaserve.replicas.engine.sequence import Sequence
from zayaserve.replicas.kv_tiers.remote_tier import RemoteTier


@dataclass(slots=True)
class CacheOps:
    """Cache work the runner applies before a step's forward."""

    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    reset_state_slots: list[int] = field(default_factory=list)
    restore_states: list[tuple[int, int]] = field(default_factory=list)  # (slot, cached block)


class KVManager:
    def __init__(self, blocks: BlockPool, slots: StateSlots, block_size: int,
                 enable_prefix_caching: bool) -> None:
        self.blocks = blocks
        self.slots = slots
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.remote: RemoteTier | None = None  # L2 (Redis), set by the engine when configured
        # Copies a CCA state slot now (src, dst): forks happen between steps, after the
        # parent's state moved on. Set by the engine (the cache's copy_state).
        self.copy_state: Callable[[int, int], None] = lambda src, dst: None
        # Prompt tokens looked up and found, per tier (a hit rate per tier for /metrics).
        self.prefix_hit_tokens = self.prefix_queried_tokens = 0  # L1
        self.remote_queried_tokens = 0  # L2: the tokens L1 missed (its hits: remote.stats)
        # L2 reads run here, off the engine thread; their blocks are installed on it.
        self._fetcher = ThreadPoolExecutor(1, "zayaserve-l2-fetch")

    # ---- admission ------------------------------------------------------------------------

    def reuse_cached_prefix(self, seq: Sequence) -> list[int] | None:
        """Points a fresh (or preempted) sequence at the cached blocks of its longest cached
        prefix, leaving at least one token to compute (its logits are needed). None: L2 may
        hold more of the prefix, and a fetch has started; admit the sequence once it is done
        (`poll_fetches`)."""
        if (not self.enable_prefix_caching or seq.num_computed_tokens or seq.block_table
                or seq.request.prompt_logprobs is not None):
            return []  # prompt logprobs need every position's logits: no reuse (as vLLM)
        usable = (seq.num_tokens - 1) // self.block_size
        hits = self.blocks.lookup(seq.block_hashes[:usable])
        if self.remote is not None and len(hits) < usable and seq.remote_blocks is None:
            wanted = seq.block_hashes[len(hits):usable]
            seq.remote_fetch = (wanted, self._fetcher.submit(
                self.remote.fetch, wanted,  # type: ignore[arg-type]
                seq.request.timeline.span_context))
            return None
        self.blocks.share(hits)
        bs, timeline = self.block_size, seq.request.timeline
        self.prefix_hit_tokens += len(hits) * bs
        self.prefix_queried_tokens += usable * bs
        timeline.local_hit_tokens = max(timeline.local_hit_tokens, len(hits) * bs)
        if seq.remote_blocks is not None:
            self.remote_queried_tokens += (usable - len(hits)) * bs
            fetched = self._install_fetched(seq, seq.block_hashes[len(hits):usable])
            timeline.remote_hit_tokens = max(timeline.remote_hit_tokens, len(fetched) * bs)
            hits = hits + fetched
        seq.remote_blocks = None
        if hits:
            seq.block_table = list(hits)
            seq.num_computed_tokens = len(hits) * self.block_size
            seq.request.num_cached_tokens = max(seq.request.num_cached_tokens,
                                                len(hits) * self.block_size)
        return hits

    def poll_fetches(self, fetching: list[Sequence]) -> list[Sequence]:
        """The sequences whose L2 fetch has finished (a failed fetch is a miss)."""
        done = [s for s in fetching if s.remote_fetch[1].done()]
        for seq in done:
            wanted, future = seq.remote_fetch
            try:
                payloads = future.result()  # the longest prefix of `wanted` that L2 had
            except Exception:
                payloads = []
            seq.remote_blocks = dict(zip(wanted, payloads, strict=False))
            seq.remote_fetch = None
        return done

    def give_back_prefix(self, seq: Sequence) -> None:
        """Undoes `reuse_cached_prefix` for a sequence that could not be admitted after all."""
        self.blocks.free(seq.block_table)
        seq.block_table, seq.num_computed_tokens = [], 0

    def _install_fetched(self, seq: Sequence, hashes: list[bytes]) -> list[int]:
        """Blocks of the longest prefix of `hashes` that the fetch brought, installed into fresh
        blocks (sealed into L1 too) — only as many as fit without preempting anyone."""
        assert self.remote is not None and seq.remote_blocks is not None
        payloads = []
        for h in hashes[:max(0, self.blocks.num_free - 1)]:
            payload = seq.remote_blocks.get(h)
            if payload is None:
                break
            payloads.append(payload)
        blocks = self.blocks.allocate(len(payloads))
        for block, h, payload in zip(blocks, hashes, payloads, strict=False):
            self.remote.install(block, payload)
            self.blocks.seal(block, h)
        self.remote.stats.hit_tokens += len(blocks) * self.block_size
        return blocks

    def assign_state_slot(self, seq: Sequence, hits: list[int], ops: CacheOps) -> None:
        """A slot for an admitted sequence: its state restored from the last cached block's
        snapshot, or reset for a sequence that starts from scratch."""
        if seq.state_slot >= 0:
            return
        seq.state_slot = self.slots.allocate()
        if hits:
            ops.restore_states.append((seq.state_slot, hits[-1]))
        else:
            ops.reset_state_slots.append(seq.state_slot)

    # ---- running --------------------------------------------------------------------------

    def reserve(self, seq: Sequence, n: int, ops: CacheOps) -> bool:
        """Make room in `seq`'s block table for n more tokens; copy a shared block we'd write."""
        bs = self.block_size
        need = -(-(seq.num_computed_tokens + n) // bs) - len(seq.block_table)
        write_block = seq.num_computed_tokens // bs
        cow = (write_block < len(seq.block_table)
               and self.blocks.ref_count(seq.block_table[write_block]) > 1)
        if need + int(cow) > self.blocks.num_free:
            return False
        if cow:
            old = seq.block_table[write_block]
            (new,) = self.blocks.allocate(1)
            ops.block_copies.append((old, new))
            self.blocks.free([old])
            seq.block_table[write_block] = new
        if need > 0:
            seq.block_table.extend(self.blocks.allocate(need))
        return True

    def seal_computed(self, seq: Sequence, before: int) -> None:
        """Indexes the blocks a step completed (their snapshots were written with them)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(before // bs, seq.num_computed_tokens // bs):
            block, block_hash = seq.block_table[i], seq.block_hashes[i]
            if self.blocks.seal(block, block_hash) and self.remote is not None:
                self.remote.publish(block, block_hash,  # type: ignore[arg-type]
                                    seq.request.timeline.span_context)

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Lets `child` share the parent's blocks and a copy of its CCA state, so the prompt is
        prefilled once; False when no state slot is free (the child then recomputes)."""
        if self.slots.num_free == 0:
            return False
        child.state_slot = self.slots.allocate()
        self.copy_state(parent.state_slot, child.state_slot)
        self.blocks.share(parent.block_table)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        return True

    def release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        if seq.state_slot >= 0:
            self.slots.free(seq.state_slot)
            seq.state_slot = -1
