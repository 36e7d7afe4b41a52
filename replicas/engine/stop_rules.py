"""What a new token does to its sequence: the stop rules on token ids (eos, stop ids,
max_tokens, the context limit, grammars; stop strings are the output processor's), what stays
banned below min_tokens, and whether the next step may be scheduled before the token is known."""

from __future__ import annotations

import logging
from collections.abc import Sequence as Sequence_

from zayaserve.replicas.engine.sequence import Sequence
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


def out_of_room(seq: Sequence, max_model_len: int, pending: int = 0) -> bool:
    """The sequence has no room left (max_tokens or the context limit) once `pending` more
    tokens, being sampled now, are appended."""
    p = seq.params
    return ((p.max_tokens is not None and seq.num_output_tokens + pending >= p.max_tokens)
            or seq.num_tokens + pending >= max_model_len)


def check_token_stop(seq: Sequence, token: int, eos_ids: Sequence_[int],
                     max_model_len: int) -> bool:
    """Sets seq.finish_reason/stop_reason when the newly appended `token` ends the sequence by
    its id or a limit; True when eos or a stop token id ended it (the output processor then
    looks for no stop string in its text: the id came first)."""
    p = seq.params
    if seq.num_output_tokens >= p.min_tokens:
        if not p.ignore_eos and token in eos_ids:
            seq.finish_reason = "stop"
            return True
        if p.stop_token_ids and token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return True
    grammar = seq.grammar
    if grammar is not None and seq.grammar_broken:
        # A token the grammar refused cannot pass the sampler's mask; should one, the text is
        # not the grammar's: end it, and never call it complete.
        logger.error("request %s: a token outside its grammar was sampled",
                     log_safe(seq.request.request_id))
        seq.finish_reason = "length"
    elif grammar is not None and grammar.is_terminated():
        seq.finish_reason = "stop"  # it accepted its stop token (even with ignore_eos)
    elif out_of_room(seq, max_model_len):
        # A constrained text is `stop` only where its grammar is complete.
        complete = grammar is not None and grammar.is_completed()
        seq.finish_reason = "stop" if complete else "length"
    return False
