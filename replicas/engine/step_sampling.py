"""From a step's logits to its tokens: which packed rows need logits (`plan_logits`), and the
sampling of those rows (`StepSampler.sample`): prompt logprobs, then one token per sequence that
reached its end this step, and per child still to fork (n > 1).

A sequence's `SamplingRow` is built once and reused every step (a row is immutable); only a
sequence whose row changes from step to step (below min_tokens its stop ids are banned;
penalties read its output ids) gets a fresh one. Draws are keyed by (seed, position), so the
host passes two ints per row, not a generator.
"""

from __future__ import annotations

import random
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass
from typing import Any

import torch

from zayaserve.replicas.engine.grammar import Grammars
from zayaserve.replicas.engine.logprobs import prompt_logprobs
from zayaserve.replicas.engine.outputs import Logprob
from zayaserve.replicas.engine.sampler import SamplingRow, random_draws, sample
from zayaserve.replicas.engine.scheduler import SampledStep, SchedulerOutput
from zayaserve.replicas.engine.sequence import Request, Sequence
from zayaserve.replicas.engine.stop_rules import banned_tokens


@dataclass(slots=True)
class LogitsPlan:
    """Which packed rows of this step need logits, and what each is for."""

    rows: list[int]
    prompt: list[tuple[Request, list[int], list[int]]]  # request, rows, next prompt tokens
    samples: list[tuple[Sequence, int, int]]  # sequence, row, the position it samples


def plan_logits(sched: SchedulerOutput) -> LogitsPlan:
    """Rows for prompt logprobs, and one row per chunk that reaches its sequence's end."""
    plan = LogitsPlan([], [], [])
    offset = 0
    for c in sched.chunks:
        seq, req = c.seq, c.seq.request
        if req.prompt_logprobs is not None and seq.index == 0:
            prompt = req.prompt_token_ids
            done = len(req.prompt_logprobs) - 1  # positions already answered
            positions = range(max(c.start, done), min(c.start + c.num_tokens, len(prompt) - 1))
            if positions:
                rows = [offset + p - c.start for p in positions]
                plan.prompt.append((req, list(range(len(plan.rows), len(plan.rows) + len(rows))),
                                    [prompt[p + 1] for p in positions]))
                plan.rows.extend(rows)
        if c.start + c.num_tokens == seq.num_tokens:
            plan.samples.append((seq, len(plan.rows), c.start + c.num_tokens))
            plan.rows.append(offset + c.num_tokens - 1)
        offset += c.num_tokens
    return plan


class StepSampler:
    def __init__(self, grammars: Grammars, eos_ids: Sequence_[int], seed: int) -> None:
        self.grammars = grammars
        self.eos_ids = eos_ids
        self._seeds = random.Random(seed)  # seeds of unseeded sequences, in arrival order

    def seed_for(self, seed: int | None) -> int:
        return seed if seed is not None else self._seeds.getrandbits(63)

    def row(self, seq: Sequence) -> SamplingRow:
        """The sequence's row for this step: its cached one unless something in it moved."""
        p = seq.params
        varies = p.has_penalties or seq.num_output_tokens < p.min_tokens
        cached = seq.sampling_row
        if cached is not None and not varies:
            return cached
        row = SamplingRow(
            p.temperature, p.top_k, p.top_p, seq.seed, p.logprobs,
            banned_tokens(seq, self.eos_ids), min_p=p.min_p,
            repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            # Token ids only for the penalties that read them (a reference, then a slice).
            prompt_token_ids=seq.request.prompt_token_ids if p.repetition_penalty != 1.0 else (),
            output_token_ids=seq.output_token_ids if p.has_penalties else ())
        seq.sampling_row = None if varies else row
        return row

    def prepare(self, plan: LogitsPlan) -> PreparedSampling:
        """The rows to sample and what each is for, read from the sequences: on the engine
        thread when the step is launched (before the forward), so the device thread only runs
        tensor maths. A child (n > 1) samples its first token from its parent's grammar state,
        and its seed (when unseeded) is drawn here, in step order."""
        rows: list[SamplingRow] = []
        positions: list[int] = []
        targets: list[tuple[Sequence, int]] = []  # (sequence, child index or -1 for itself)
        row_ids: list[int] = []
        for seq, logit_row, position in plan.samples:
            row = self.row(seq)
            rows.append(row)
            positions.append(position)
            targets.append((seq, -1))
            row_ids.append(logit_row)
            for child in range(1, seq.forks_pending + 1):  # index 0 is the sequence itself
                child_row = SamplingRow(
                    row.temperature, row.top_k, row.top_p,
                    self.seed_for(seq.params.child_seed(child)), row.num_logprobs,
                    row.banned_token_ids, row.min_p, row.repetition_penalty,
                    row.presence_penalty, row.frequency_penalty, row.prompt_token_ids,
                    row.output_token_ids)
                rows.append(child_row)
                positions.append(position)
                targets.append((seq, child))
                row_ids.append(logit_row)
        mask = self.grammars.step_mask([seq.grammar for seq, _ in targets])
        return PreparedSampling(plan, rows, positions, targets, row_ids, mask,
                                random_draws(rows, positions) if rows else None)

    def run(self, prepared: PreparedSampling, logits: torch.Tensor) -> SampledStep:
        """Prompt logprobs and the tokens of a prepared step, from its logits."""
        prompt: list[tuple[Request, list[dict[int, Logprob] | None]]] = []
        for req, prompt_rows, next_ids in prepared.plan.prompt:
            k = req.params.prompt_logprobs
            assert k is not None
            prompt.append((req, list(prompt_logprobs(
                logits[prompt_rows],
                torch.tensor(next_ids, dtype=torch.int64, device=logits.device), k))))
        rows, row_ids = prepared.rows, prepared.row_ids
        if not rows:
            return SampledStep([], prompt)
        picked = logits if row_ids == list(range(logits.shape[0])) else logits[row_ids]
        sampled = sample(picked, rows, prepared.mask, prepared.positions, prepared.draws)
        return SampledStep([(seq, child, row.seed, tok) for (seq, child), row, tok
                            in zip(prepared.targets, rows, sampled, strict=True)], prompt)


@dataclass(slots=True)
class PreparedSampling:
    plan: LogitsPlan
    rows: list[SamplingRow]
    positions: list[int]
    targets: list[tuple[Sequence, int]]
    row_ids: list[int]
    mask: Any
    draws: torch.Tensor | None  # the random rows' uniform numbers (sampler.random_draws)


def decode_plan(sched: SchedulerOutput) -> LogitsPlan:
    """The plan of a step of one-token decodes scheduled ahead (each samples its token)."""
    return LogitsPlan(list(range(len(sched.chunks))), [],
                      [(c.seq, i, c.start + 1) for i, c in enumerate(sched.chunks)])
