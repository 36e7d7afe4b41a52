"""Turns a scheduler decision into model forwards: packs the chunks into StepBatches, applies
pending cache copies and state resets, and returns the logits that were asked for.

With `micro_batches=N` (N > 1) the step is split into N micro-batches of about equal tokens, run
on N threads: while one waits on its experts (a remote round trip that releases the GIL), the
others compute attention, so N - 1 micro-batches' attention can hide one's dispatch. They touch
disjoint cache slots and state slots, so they need no locking.

Decode-only steps replay captured graphs when `graphs` is set (see `decode_graphs`).

`prepare` reads what the step needs from the sequences (token ids, block tables, state slots)
on the scheduling thread (`prepare` says why a block table need not be copied); `execute` may
then run on another (async scheduling): it touches no sequence, so the scheduler can finish or
grow them meanwhile. A token that the previous step is still sampling is not in its sequence
yet: `execute` takes it from `fill` (sequence id -> token).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from zayaserve.replicas.engine.decode_graphs import DecodeGraphs
from zayaserve.replicas.engine.request_timeline import RequestTimeline
from zayaserve.replicas.engine.scheduler import SchedulerOutput
from zayaserve.replicas.model.attention_side import AttentionSideModel
from zayaserve.replicas.model.batch import StepBatch
from zayaserve.replicas.model.experts import ExpertBackend
from zayaserve.replicas.model.kv_cache import KVCache
from zayaserve.replicas.observability.dispatch_tracing import end_step, set_step_requests


class ModelRunner:
    def __init__(self, model: AttentionSideModel, experts: ExpertBackend, cache: KVCache,
                 micro_batches: int = 1, graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.graphs = graphs if micro_batches == 1 else None
        self.experts = experts
        self.cache = cache
        self.micro_batches = micro_batches
        self._pool = (ThreadPoolExecutor(micro_batches, "zayaserve-mb") if micro_batches > 1
                      else None)
        cache.initial_v_state.copy_(model.initial_v_states())

    def prepare(self, sched: SchedulerOutput) -> PreparedStep:
        """The step's inputs, read from its sequences (on the scheduling thread). A block
        table is taken by reference, not copied: while a step is in flight its sequence's
        table only grows at the end (a finished sequence gets a new, empty list), and a step
        never reads past its own positions."""
        chunks = [_Chunk(c.seq.seq_id, c.seq.token_ids[c.start:c.start + c.num_tokens], c.start,
                         c.num_tokens, c.seq.block_table, c.seq.state_slot,
                         c.seq.request.timeline) for c in sched.chunks]
        return PreparedStep(chunks, list(sched.block_copies), list(sched.reset_state_slots),
                            list(sched.restore_states))

    def execute(self, step: PreparedStep, logits_rows: list[int],
                fill: Mapping[int, int] | None = None) -> torch.Tensor:
        """Runs a prepared step; returns fp32 logits [len(logits_rows), V], the rows (ascending)
        indexing the step's packed tokens. `fill`: tokens the step before sampled, by sequence
        id."""
        for c in step.chunks:
            if len(c.tokens) < c.num_tokens:  # its last token is the previous step's sample
                assert fill is not None and len(c.tokens) == c.num_tokens - 1, "missing tokens"
                c.tokens = [*c.tokens, fill[c.seq_id]]
        for src, dst in step.block_copies:
            self.cache.copy_block(src, dst)
        for slot in step.reset_state_slots:
            self.cache.reset_state(slot)
        for slot, block in step.restore_states:
            self.cache.restore_state(slot, block)
        parts = _split(step.chunks, self.micro_batches) if self._pool is not None else []
        if len(parts) < 2:
            return self._forward(step.chunks, logits_rows)
        assert self._pool is not None
        futures, offset = [], 0
        for part in parts:
            end = offset + sum(c.num_tokens for c in part)
            rows = [r - offset for r in logits_rows if offset <= r < end]
            futures.append(self._pool.submit(self._forward, part, rows))
            offset = end
        return torch.cat([f.result() for f in futures])

    def _forward(self, chunks: list[_Chunk], rows: list[int]) -> torch.Tensor:
        set_step_requests(c.timeline for c in chunks)  # for dispatch traces
        try:
            return self._forward_chunks(chunks, rows)
        finally:
            end_step()

    def _forward_chunks(self, chunks: list[_Chunk], rows: list[int]) -> torch.Tensor:
        packed = [(c.tokens, c.start, c.block_table, c.state_slot) for c in chunks]
        snapshots = self._snapshot_rows(chunks) if self.cache.conv_snap is not None else None
        graphs = self.graphs
        if graphs is not None and graphs.can_run(packed):
            return graphs.run(packed, rows, snapshots)
        batch = StepBatch.build(packed, self.cache.block_size, rows, device=self.cache.device,
                                snapshots=snapshots)
        return self.model(batch, self.cache, self.experts)

    def _snapshot_rows(self, chunks: list[_Chunk]) -> list[tuple[int, int]]:
        """(packed row, block) for every token that completes a block in this step."""
        bs, out, offset = self.cache.block_size, [], 0
        for c in chunks:
            end = c.start + c.num_tokens
            for p in range(c.start + (bs - 1 - c.start % bs), end, bs):
                out.append((offset + p - c.start, c.block_table[p // bs]))
            offset += c.num_tokens
        return out


@dataclass(slots=True)
class _Chunk:
    seq_id: int
    tokens: list[int]
    start: int
    num_tokens: int
    block_table: list[int]
    state_slot: int
    timeline: RequestTimeline


@dataclass(slots=True)
class PreparedStep:
    chunks: list[_Chunk]
    block_copies: list[tuple[int, int]]
    reset_state_slots: list[int]
    restore_states: list[tuple[int, int]]


def _split(chunks: list[_Chunk], parts: int) -> list[list[_Chunk]]:
    """The chunks in at most `parts` consecutive, non-empty groups of about equal tokens: each
    chunk goes to the share of the step its middle token falls in."""
    total = sum(c.num_tokens for c in chunks)
    if parts < 2 or len(chunks) < 2 or total == 0:
        return [chunks]
    groups: dict[int, list[_Chunk]] = {}
    acc = 0
    for c in chunks:
        share = min(parts - 1, (2 * acc + c.num_tokens) * parts // (2 * total))
        groups.setdefault(share, []).append(c)
        acc += c.num_tokens
    return list(groups.values())
