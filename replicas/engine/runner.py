"""Turns a scheduler decision into one model forward: packs the chunks into a StepBatch,
applies pending cache copies and state resets, and returns the logits that were asked for."""

from __future__ import annotations

import torch

from zayaserve.replicas.engine.scheduler import SchedulerOutput
from zayaserve.replicas.model.attention_side import AttentionSideModel
from zayaserve.replicas.model.batch import StepBatch
from zayaserve.replicas.model.experts import ExpertBackend
from zayaserve.replicas.model.kv_cache import KVCache


class ModelRunner:
    def __init__(self, model: AttentionSideModel, experts: ExpertBackend, cache: KVCache):
        self.model = model
        self.experts = experts
        self.cache = cache
        cache.initial_v_state.copy_(model.initial_v_states())

    def run(self, sched: SchedulerOutput, logits_rows: list[int]) -> torch.Tensor:
        """logits_rows index the packed tokens of this step; returns fp32 [len(rows), V]."""
        for src, dst in sched.block_copies:
            self.cache.copy_block(src, dst)
        for slot in sched.reset_state_slots:
            self.cache.reset_state(slot)
        chunks = [
            (c.seq.token_ids[c.start:c.start + c.num_tokens], c.start, c.seq.block_table,
             c.seq.state_slot)
            for c in sched.chunks]
        batch = StepBatch.build(chunks, self.cache.block_size, logits_rows)
        return self.model(batch, self.cache, self.experts)
