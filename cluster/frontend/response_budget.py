"""What one response may carry: logprob entries (a token's logprob, or one of its top
alternatives) are the part of a response that grows with prompt length × k × n, and each costs
a decoded token string and ~100 bytes of JSON. A request whose worst case is over
`max_response_logprobs` is refused before anything runs (400 naming the field that multiplies
it), so no single request can make the ingress format hundreds of megabytes.

Counted per prompt: prompt positions × (k + 1) for `prompt_logprobs`, the same again for each
of the n choices that echo the prompt with logprobs, and max_tokens × (k + 1) for each choice's
own tokens (max_tokens defaults to the room left in the context)."""

from __future__ import annotations

from collections.abc import Sequence

from zayaserve.cluster.frontend.frontend_errors import InvalidRequestError

DEFAULT_MAX_RESPONSE_LOGPROBS = 500_000


def logprob_entries(prompt_lens: Sequence[int], n: int, max_tokens: int | None,
                    max_model_len: int, logprobs: int | None, prompt_logprobs: int | None,
                    echo_logprobs: int | None = None) -> int:
    """The most logprob entries the response can carry (the worst case, before running):
    `logprobs` for the generated tokens, `echo_logprobs` for an echoed prompt's."""
    total = 0
    for length in prompt_lens:
        room = max_tokens if max_tokens is not None else max(max_model_len - length, 0)
        if prompt_logprobs is not None:
            total += length * (prompt_logprobs + 1)
        if logprobs is not None:
            total += n * room * (logprobs + 1)
        if echo_logprobs is not None:
            total += n * length * (echo_logprobs + 1)
    return total


def check_response_budget(entries: int, limit: int, param: str) -> None:
    if entries > limit:
        raise InvalidRequestError(
            f"{param}: the response could carry {entries:,} logprob entries (prompt positions "
            f"and max_tokens, times k+1, times n, over every prompt), more than the "
            f"{limit:,} a response may hold (max_response_logprobs); ask for fewer logprobs, "
            f"choices, prompts or tokens", param)
