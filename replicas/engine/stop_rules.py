"""What a new token does to its sequence: the stop rules (eos, stop ids and strings,
max_tokens, the context limit, grammars), what stays banned below min_tokens, whether the next
step may be scheduled before the token is known, and the step's `StepDelta` for a request
(only what is new, holding back text a stop string may still cut)."""

from __future__ import annotations

import logging
from collections.abc import Sequence as Sequence_

from zayaserve.replicas.engine.outputs import CompletionStep, StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.sequence import Request, Sequence
from zayaserve.replicas.model.tokenizer import IncrementalDetokenizer
from zayaserve.replicas.observability.safe_text import log_safe

logger = logging.getLogger("zayaserve.replicas.engine.scheduler")


def runs_ahead(seq: Sequence) -> bool:
    """Whether the sequence's next step can be scheduled before its current token is known:
    nothing in the next sampling depends on that token (no grammar to advance, no penalties
    to count it, no min_tokens ban to lift, no children to fork, no prompt logprobs)."""
    p = seq.params
    return (seq.grammar is None and not p.has_penalties and seq.forks_pending == 0
            and seq.num_output_tokens >= p.min_tokens and seq.request.prompt_logprobs is None)


def banned_tokens(seq: Sequence, eos_ids: Sequence_[int]) -> tuple[int, ...]:
    """Below min_tokens, no token that would stop the sequence may be sampled."""
    p = seq.params
    if seq.num_output_tokens >= p.min_tokens:
        return ()
    ids = list(p.stop_token_ids or [])
    if not p.ignore_eos:
        ids.extend(eos_ids)
    return tuple(sorted(set(ids)))


def text_detokenizer(seq: Sequence, token: int) -> IncrementalDetokenizer | None:
    """The detokenizer `token` goes to: none when it adds no text. A stop token id that ends
    a constrained text is the grammar's stop token (grammar.py): like eos, it is not part of
    the text the grammar accepted."""
    if seq.grammar is not None and token in (seq.params.stop_token_ids or ()):
        return None
    return seq.detokenizer


def out_of_room(seq: Sequence, max_model_len: int, pending: int = 0) -> bool:
    """The sequence has no room left (max_tokens or the context limit) once `pending` more
    tokens, being sampled now, are appended."""
    p = seq.params
    return ((p.max_tokens is not None and seq.num_output_tokens + pending >= p.max_tokens)
            or seq.num_tokens + pending >= max_model_len)


def update_text_and_check_stop(
    seq: Sequence, token: int, eos_ids: Sequence_[int], max_model_len: int,
    delta: str | None = None,
) -> None:
    """Sets seq.finish_reason/stop_reason when the newly appended `token` ends the sequence.
    `delta`: the text the token added, when already detokenized (`add_batch`)."""
    p = seq.params
    if delta is None:
        detok = text_detokenizer(seq, token)
        delta = detok.add(token) if detok is not None else ""
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
    if seq.finish_reason is None and out_of_room(seq, max_model_len):
        # A constrained text is `stop` only where its grammar is complete.
        complete = grammar is not None and grammar.is_completed()
        seq.finish_reason = "stop" if complete else "length"
    if seq.finish_reason is not None and seq.detokenizer is not None:
        seq.text += seq.detokenizer.flush()  # bytes held back for an unfinished character


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
    ended = False
    for s in (sorted(seqs, key=lambda s: s.index) if len(seqs) > 1 else seqs):
        start = s.prompt_len + s.sent_tokens
        new_ids = tuple(s.token_ids[start:])
        done = s.finish_reason is not None
        ended |= done
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
    done = ended and req.finished  # a request can only end in a step that ended a sequence
    metrics = req.timeline.finish(
        sum(s.num_output_tokens for s in req.seqs),
        [s.finish_reason or "" for s in req.seqs]) if done else None
    return StepDelta(
        req.request_id, tuple(steps), done, req.num_cached_tokens,
        tuple(req.prompt_token_ids) if first else None,
        list(req.prompt_logprobs) if first and req.prompt_logprobs is not None else None,
        metrics)
