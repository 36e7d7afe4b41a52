"""User-facing sampling parameters, mirroring vLLM's ``SamplingParams`` names and defaults."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zayaserve.replicas.engine.structured import StructuredOutputsParams
from zayaserve.replicas.validation_errors import ParamError

# Temperatures below this are treated as greedy decoding (same threshold vLLM uses); dividing
# logits by anything this small would overflow float32 anyway.
SAMPLING_EPS = 1e-5

# Matches vLLM's default ``max_logprobs``: larger requests cost a top-k over the vocabulary per
# token for little benefit, so they are rejected rather than silently truncated.
MAX_LOGPROBS = 20

# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `n=True` is almost certainly a caller bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParamError(name, f"{name} must be a number, got {value!r}")
    result = float(value)
    # NaN passes every range check (it compares unequal to everything), and inf reaches the
    # sampler as inf/inf = NaN probabilities: neither is a setting anyone means.
    if not math.isfinite(result):
        raise ParamError(name, f"{name} must be a finite number, got {value!r}")
    return result


def _as_int(name: str, value: object) -> int:
    if not _is_int(value):
        raise ParamError(name, f"{name} must be an int, got {value!r}")
    assert isinstance(value, int)
    return value


def _as_optional_int(name: str, value: object) -> int | None:
    return None if value is None else _as_int(name, value)


def _as_list(name: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ParamError(name, f"{name} must be a list, got {value!r}")
    return list(value)


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request; field names, defaults and meaning follow vLLM.

    Instances are validated and normalised on construction: ``top_k=-1`` becomes ``0`` (off),
    a single ``stop`` string becomes a one-element list, and ``None`` lists become ``[]``.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Prefix-cache salt (vLLM's `cache_salt`): cached blocks are shared only among requests
    # with the same salt. The front ends combine it with the caller's API-key salt.
    cache_salt: str | None = None
    # vLLM's sampling extras, last so that positional construction keeps its meaning.
    # min_p (0 = off): drop tokens less likely than min_p times the most likely one.
    min_p: float = 0.0
    # Penalties as vLLM applies them, to the raw logits: repetition_penalty (HF/CTRL style,
    # 1.0 = off) covers every token of the prompt and of the output so far; presence and
    # frequency (OpenAI style, 0 = off) only the generated tokens.
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Structured outputs (vLLM's name): a JSON schema, regex, choice or grammar the text must
    # follow; a mapping of StructuredOutputsParams' fields is accepted too.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self.n = _as_int("n", self.n)
        if self.n < 1:
            raise ParamError("n", f"n must be >= 1, got {self.n}")

        self.temperature = _as_float("temperature", self.temperature)
        if self.temperature < 0.0:
            raise ParamError("temperature", f"temperature must be >= 0, got {self.temperature}")

        self.top_p = _as_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p}")

        self.top_k = _as_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ParamError(
                "top_k", f"top_k must be -1 (disable), 0 (disable) or >= 1, got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0

        self._check_extras()
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)

        self.seed = _as_optional_int("seed", self.seed)
        if self.seed is not None and not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise ParamError("seed", f"seed must fit in 64 bits, got {self.seed}")

        self._check_lengths()
        self._check_logprobs()
        self._normalise_stops()

        if self.cache_salt is not None and (
                not isinstance(self.cache_salt, str) or not 0 < len(self.cache_salt) <= 256):
            raise ParamError("cache_salt", "cache_salt must be a string of 1 to 256 characters")

        for flag in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise ParamError(flag, f"{flag} must be a bool, got {value!r}")

    def _check_extras(self) -> None:
        self.min_p = _as_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ParamError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ParamError("repetition_penalty",
                             f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _as_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ParamError(name, f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)

    def _check_lengths(self) -> None:
        self.max_tokens = _as_optional_int("max_tokens", self.max_tokens)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ParamError(
                "max_tokens", f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        self.min_tokens = _as_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ParamError("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError(
                "min_tokens",
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

    def _check_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = _as_optional_int(name, getattr(self, name))
            if value is not None and value < 0:
                raise ParamError(name, f"{name} must be >= 0 or None, got {value}")
            if value is not None and value > MAX_LOGPROBS:
                raise ParamError(name, f"{name} must be <= {MAX_LOGPROBS}, got {value}")

    def _normalise_stops(self) -> None:
        stops = [self.stop] if isinstance(self.stop, str) else _as_list("stop", self.stop)
        for entry in stops:
            if not isinstance(entry, str) or not entry:
                raise ParamError("stop", f"stop entries must be non-empty strings, got {entry!r}")
        self.stop = stops

        ids = _as_list("stop_token_ids", self.stop_token_ids)
        for token_id in ids:
            if not _is_int(token_id) or token_id < 0:
                raise ParamError(
                    "stop_token_ids", f"stop_token_ids entries must be ints >= 0, got {token_id!r}")
        self.stop_token_ids = ids
        if self.stop and self.structured_outputs is not None:
            # A constrained text ends where its grammar is complete (or at max_tokens); a stop
            # string could cut it anywhere and still report `stop`.
            raise ParamError("stop", "stop: stop strings cannot be combined with "
                             "structured_outputs (the grammar decides where the text ends; "
                             "stop_token_ids are allowed there)")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature ~0 or top_k == 1)."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """True when any of the repetition/presence/frequency penalties is on."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def child_seed(self, index: int) -> int | None:
        """Seed for the ``index``-th of the ``n`` completions, or None when unseeded.

        Each child gets its own deterministic seed so the n samples differ from one another yet
        the whole request replays exactly; child 0 uses the request seed unchanged so ``n=1``
        behaves as if seeding a single generator with ``seed``.
        """
        if self.seed is None:
            return None
        if not 0 <= index < self.n:
            raise ValueError(f"index must be in [0, n={self.n}), got {index}")
        child = self.seed + index
        # Stay inside the range manual_seed accepts; wrapping keeps children distinct.
        return child - 2**64 if child > _SEED_MAX else child
