"""After a token is sampled: detokenise it, decide whether the sequence stops, and cut the
step's `StepDelta` (only what is new, with stop-string holdback)."""

from __future__ import annotations

from collections.abc import Sequence as Sequence_
from typing import NamedTuple

import torch

from zayaserve.replicas.engine.outputs import CompletionStep, Logprob, StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.sampler import SampledToken
from zayaserve.replicas.engine.sequence import Request, Sequence


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
    delta = seq.detokenizer.add(token) if seq.detokenizer is not None else ""
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
    out_of_room = (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or (
        seq.num_tokens >= max_model_len)
    if seq.finish_reason is None and out_of_room:
        seq.finish_reason = "length"
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
    return StepDelta(
        req.request_id, tuple(steps), req.finished, req.num_cached_tokens,
        tuple(req.prompt_token_ids) if first else None,
        list(req.prompt_logprobs) if first and req.prompt_logprobs is not None else None)
