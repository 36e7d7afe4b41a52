"""Token-budget scheduler: no prefill/decode phases, only sequences whose computed tokens catch
up to their known tokens. Running sequences go first (a decode is one token, a prefill a chunk),
then waiting ones while budget, sequence slots and KV blocks last. When blocks run out, the
most recently admitted running sequence is preempted and later recomputed.

A step is `schedule()` -> the model runs -> `update_from_output()`, which owns everything after
the forward: computed-token counts, sealing, prompt logprobs, forks, appending, stop checks,
finishing, and the step's `StepDelta`s (only what is new, with stop-string holdback). What
each sequence holds in the cache is the `KVManager`'s business."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from zayaserve.replicas.engine.block_pool import BlockPool, StateSlots
from zayaserve.replicas.engine.kv_manager import CacheOps, KVManager
from zayaserve.replicas.engine.outputs import CompletionStep, Logprob, StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.sampler import SampledToken
from zayaserve.replicas.engine.sequence import Request, Sequence, Status
from zayaserve.replicas.observability.safe_text import log_safe

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
        # Makes the child sequence of an n > 1 request (the engine's, which owns generators,
        # detokenizers and hashers): (request, completion index, token ids) -> Sequence.
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

    def update_from_output(self, sched: SchedulerOutput, sampled: SampledStep) -> list[StepDelta]:
        """Applies a step's results; returns one StepDelta per request that got tokens."""
        for c in sched.chunks:
            if c.start < c.seq.prompt_len:
                c.seq.request.timeline.on_prefill_chunk(c.start, c.num_tokens)
            c.seq.num_computed_tokens += c.num_tokens
            self.kv.seal_computed(c.seq, c.start)
        for req, entries in sampled.prompt_logprobs:
            assert req.prompt_logprobs is not None
            req.prompt_logprobs.extend(entries)
        # Children fork from the parent's state before anyone appends a token.
        seqs = [self._fork(seq, child, gen) if child >= 0 else seq
                for seq, child, gen, _ in sampled.tokens]
        touched: dict[str, tuple[Request, list[Sequence]]] = {}
        for seq, (_, _, _, tok) in zip(seqs, sampled.tokens, strict=True):
            seq.append(tok.token_id, tok.logprob, tok.logprobs)
            update_text_and_check_stop(seq, tok.token_id, self.config.eos_token_ids,
                                       self.config.max_model_len)
            if seq.finish_reason is not None:
                self.finish(seq)
            touched.setdefault(seq.request.request_id, (seq.request, []))[1].append(seq)
        for seq, child, _, _ in sampled.tokens:
            if child < 0:
                seq.forks_pending = 0
        return [step_delta(req, group) for req, group in touched.values()]

    def _fork(self, parent: Sequence, index: int, generator: object) -> Sequence:
        """A child of an n > 1 request: shares the parent's prompt blocks and copies its CCA
        state, so the prompt is prefilled once (or, with no room now, recomputes later)."""
        assert self.spawn is not None, "forks need the engine's spawn"
        child = self.spawn(parent.request, index, list(parent.token_ids))
        child.generator = generator  # type: ignore[assignment]
        if (parent.status is Status.RUNNING and len(self.running) < self.config.max_num_seqs
                and self.kv.fork(parent, child)):
            child.status = Status.RUNNING
            self.running.append(child)
        else:
            self.add(child)
        return child


# ---- stop rules and the step's deltas ----------------------------------------------------


def banned_tokens(seq: Sequence, eos_ids: Sequence_[int]) -> tuple[int, ...]:
    """Below min_tokens, no token that would stop the sequence may be sampled."""
    p = seq.params
    if seq.num_output_tokens >= p.min_tokens:
        return ()
    ids = list(p.stop_token_ids or [])
    if not p.ignore_eos:
        ids.extend(eos_ids)
    return tuple(sorted(set(ids)))


def update_text_and_check_stop(
    seq: Sequence, token: int, eos_ids: Sequence_[int], max_model_len: int
) -> None:
    """Sets seq.finish_reason/stop_reason when the newly appended `token` ends the sequence."""
    p = seq.params
    # A stop token id that ends a constrained text is the grammar's stop token (grammar.py):
    # like eos, it is not part of the text the grammar accepted.
    grammar_stop = seq.grammar is not None and token in (p.stop_token_ids or ())
    detok = seq.detokenizer
    delta = detok.add(token) if detok is not None and not grammar_stop else ""
    seq.text += delta
    if seq.num_output_tokens >= p.min_tokens:
        if not p.ignore_eos and token in eos_ids:
            seq.finish_reason = "stop"
        elif p.stop_token_ids and token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        if seq.finish_reason is None and p.stop and delta:
            for stop in p.stop:
                # Only the tail that this token could have completed needs searching.
                at = seq.text.find(stop, max(0, len(seq.text) - len(delta) - len(stop) + 1))
                if at >= 0:
                    end = at + len(stop) if p.include_stop_str_in_output else at
                    seq.text = seq.text[:end]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return
    grammar = seq.grammar
    if seq.finish_reason is None and grammar is not None and seq.grammar_broken:
        # A token the grammar refused cannot pass the sampler's mask; should one, the text is
        # not the grammar's: end it, and never call it complete.
        logger.error("request %s: a token outside its grammar was sampled",
                     log_safe(seq.request.request_id))
        seq.finish_reason = "length"
    elif seq.finish_reason is None and grammar is not None and grammar.is_terminated():
        seq.finish_reason = "stop"  # it accepted its stop token (even with ignore_eos)
    out_of_room = (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or (
        seq.num_tokens >= max_model_len)
    if seq.finish_reason is None and out_of_room:
        # A constrained text is `stop` only where its grammar is complete.
        complete = grammar is not None and grammar.is_completed()
        seq.finish_reason = "stop" if complete else "length"
    if seq.finish_reason is not None and seq.detokenizer is not None:
        seq.text += seq.detokenizer.flush()  # bytes held back for an unfinished character


class SampledStep(NamedTuple):
    """What a step's logits gave: the token of each sampled row — (sequence, child index or
    -1 for the sequence itself, the generator that drew it, the token) — and each request's
    new prompt logprobs."""

    tokens: list[tuple[Sequence, int, torch.Generator, SampledToken]]
    prompt_logprobs: list[tuple[Request, list[dict[int, Logprob] | None]]]


def _holdback(params: SamplingParams) -> int:
    """Characters a running completion keeps back: a stop string completed by a later token
    would cut them off, and what a client got is never taken back."""
    if not params.stop or params.include_stop_str_in_output:
        return 0
    return max(len(s) for s in params.stop) - 1


def step_delta(req: Request, seqs: list[Sequence]) -> StepDelta:
    """The request's news from this step, for the sequences that got a token (O(new))."""
    hold = _holdback(req.params)
    steps = []
    for s in sorted(seqs, key=lambda s: s.index):
        start = s.prompt_len + s.sent_tokens
        new_ids = tuple(s.token_ids[start:])
        done = s.finish_reason is not None
        visible = len(s.text) if done else max(s.sent_chars, len(s.text) - hold)
        logprobs = tuple(s.logprobs[s.sent_tokens:]) if s.logprobs is not None else None
        steps.append(CompletionStep(
            s.index, new_ids, s.text[s.sent_chars:visible], logprobs,
            s.cumulative_logprob if s.logprobs is not None else None,
            s.finish_reason, s.stop_reason))
        s.sent_tokens += len(new_ids)
        s.sent_chars = max(s.sent_chars, visible)
    first = not req.prompt_sent
    req.prompt_sent = True
    req.timeline.on_tokens()
    done = req.finished
    metrics = req.timeline.finish(
        sum(s.num_output_tokens for s in req.seqs),
        [s.finish_reason or "" for s in req.seqs]) if done else None
    return StepDelta(
        req.request_id, tuple(steps), done, req.num_cached_tokens,
        tuple(req.prompt_token_ids) if first else None,
        list(req.prompt_logprobs) if first and req.prompt_logprobs is not None else None,
        metrics)
