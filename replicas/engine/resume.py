"""Resuming a request where another engine left it: request migration.

When the attention worker streaming a request dies, the ingress sends the request to another
worker with what its client already has: the output tokens, how many characters of text were
sent, and the cumulative logprob. The new engine starts the sequence with those tokens as its
outputs (a recompute, as after a preemption), so everything that depends on the outputs so far
sees them: max_tokens and min_tokens, penalties, the grammar's state, stop strings (searched
from the text they make, with the characters not yet sent still held back). Draws are keyed by
(seed, position) (`noise`), so a seeded or greedy request draws what it would have drawn: the
client's stream goes on with the tokens an uninterrupted run gives.

One completion per request (n = 1): the completions of an n > 1 request share a parent whose
state is not carried.
"""

from __future__ import annotations

from dataclasses import dataclass

from zayaserve.replicas.engine.params import ParamError, SamplingParams


@dataclass(frozen=True, slots=True)
class Resume:
    """What the client of a request already has (its only completion's)."""

    output_token_ids: tuple[int, ...]
    sent_chars: int  # characters of text in the deltas sent
    cumulative_logprob: float = 0.0


def check_resume(resume: Resume, params: SamplingParams, prompt_len: int, vocab: int,
                 max_model_len: int) -> None:
    """ParamError naming what is wrong with a resume of a request with these params."""
    if params.n != 1:
        raise ParamError("n", f"n: a request resumes with one completion, got n={params.n}")
    bad = [t for t in resume.output_token_ids if not 0 <= t < vocab]
    if bad:
        raise ParamError("resume", f"resume: output ids {bad[:5]} are outside the vocabulary "
                         f"[0, {vocab})")
    done = len(resume.output_token_ids)
    if params.max_tokens is not None and done >= params.max_tokens:
        raise ParamError("resume", f"resume: {done} output tokens leave none of max_tokens "
                         f"{params.max_tokens} to generate")
    if prompt_len + done >= max_model_len:
        raise ParamError("resume", f"resume: {prompt_len} prompt and {done} output tokens leave "
                         f"no room within max_model_len {max_model_len}")
    if resume.sent_chars < 0:
        raise ParamError("resume", f"resume: sent_chars must be >= 0, got {resume.sent_chars}")
