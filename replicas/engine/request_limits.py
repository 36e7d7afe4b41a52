"""Checks a request against the engine's limits before it is admitted, so that nothing a client
sends can make a step fail: every refusal is a `ParamError` naming the field."""

from __future__ import annotations

from collections.abc import Sequence

from zayaserve.replicas.engine.config import RequestLimits
from zayaserve.replicas.engine.params import ParamError, SamplingParams


def check_prompt(prompt_token_ids: Sequence[int], vocab_size: int) -> None:
    if not prompt_token_ids:
        raise ParamError("prompt", "prompt: must contain at least one token")
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ParamError("prompt_token_ids", f"prompt_token_ids: ids {bad[:5]} are outside the "
                         f"vocabulary [0, {vocab_size})")


def check_request(
    params: SamplingParams, limits: RequestLimits, vocab_size: int, eos_ids: Sequence[int],
    has_tokenizer: bool = True,
) -> None:
    """`has_tokenizer`: whether the checkpoint has one (stop strings need it)."""
    if params.n > limits.max_n:
        raise ParamError("n", f"n must be <= {limits.max_n} (limits.max_n), got {params.n}")
    if params.temperature > limits.max_temperature:
        raise ParamError("temperature", f"temperature must be <= {limits.max_temperature} "
                         f"(limits.max_temperature), got {params.temperature}")
    stops = params.stop or []
    if len(stops) > limits.max_stop_strings:
        raise ParamError("stop", f"stop: at most {limits.max_stop_strings} strings "
                         f"(limits.max_stop_strings), got {len(stops)}")
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.max_stop_string_chars:
        raise ParamError("stop", f"stop: strings must be at most {limits.max_stop_string_chars} "
                         f"characters (limits.max_stop_string_chars), got one of {longest}")
    _check_stop_token_ids(params, limits, vocab_size, eos_ids)
    if stops and not has_tokenizer:
        raise ParamError("stop", "stop: stop strings need a tokenizer and this checkpoint has "
                         "none; use stop_token_ids")


def _check_stop_token_ids(
    params: SamplingParams, limits: RequestLimits, vocab_size: int, eos_ids: Sequence[int]
) -> None:
    ids = params.stop_token_ids or []
    if len(ids) > limits.max_stop_token_ids:
        raise ParamError(
            "stop_token_ids", f"stop_token_ids: at most {limits.max_stop_token_ids} ids "
                         f"(limits.max_stop_token_ids), got {len(ids)}")
    outside = [t for t in ids if t >= vocab_size]
    if outside:
        raise ParamError(
            "stop_token_ids", f"stop_token_ids: ids {outside[:5]} are outside the vocabulary "
                         f"[0, {vocab_size})")
    if params.min_tokens > 0:
        # Below min_tokens every stopping token is banned from sampling: some must remain.
        banned = set(ids) | (set() if params.ignore_eos else {t for t in eos_ids
                                                              if 0 <= t < vocab_size})
        if len(banned) >= vocab_size:
            raise ParamError(
                "stop_token_ids", "stop_token_ids: together with EOS they cover the whole "
                "vocabulary, so nothing could be sampled before min_tokens")
