"""What an RSA run sends its caller while it runs, and what a caller sends to start one.

A run streams `RSAProgress` (a round started, a call finished), the final round's deltas as
`RSAAnswerDelta` (tagged with the answer's index, as a choice of the response) and, last,
`RSADone` with the per-round figures. The same events cross a process boundary (Ray) from an
attention worker to the front end, so all are plain picklable dataclasses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.rsa.params import RSAParams


@dataclass(frozen=True, slots=True)
class RoundStats:
    """One round's calls and tokens; `max_context` is its longest prompt + completion."""

    index: int
    calls: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    max_context: int


@dataclass(frozen=True, slots=True)
class RSAProgress:
    """Round `round` (0-based) of `rounds` is running; `calls_done` of the whole run's
    `calls_total` calls have finished."""

    round: int
    rounds: int
    calls_done: int
    calls_total: int


@dataclass(frozen=True, slots=True)
class RSAAnswerDelta:
    """A delta of the final round's call `index` (the response's choice `index`)."""

    index: int
    delta: StepDelta


class RoundTotals:
    """The whole run's figures, summed over `rounds`."""

    __slots__ = ()
    rounds: Sequence[RoundStats]

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.rounds)

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens for r in self.rounds)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.rounds)

    @property
    def calls(self) -> int:
        return sum(r.calls for r in self.rounds)

    @property
    def max_context(self) -> int:
        return max(r.max_context for r in self.rounds)


@dataclass(frozen=True, slots=True)
class RSADone(RoundTotals):
    rounds: tuple[RoundStats, ...]
    population: tuple[tuple[str, ...], ...] | None = None  # every round's texts


RSAEvent = RSAProgress | RSAAnswerDelta | RSADone


@dataclass(frozen=True, slots=True)
class RSAJob:
    """One RSA request as the engine side needs it.

    `prompt_text`/`prompt_ids` are round 0's prompt (the rendered conversation). `problem` is
    the text `{problem}` shows in aggregation prompts (the conversation's last user message);
    an aggregation prompt is rendered as `history` plus one user message holding it, with
    `template_kwargs` (so a system prompt and chat-template switches carry over).
    """

    request_id: str
    problem: str
    prompt_text: str | None
    prompt_ids: list[int]
    params: RSAParams
    history: list[dict[str, Any]] = field(default_factory=list)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    cache_salt: str | None = None
    chat: bool = True  # False: aggregation prompts are encoded as plain text
