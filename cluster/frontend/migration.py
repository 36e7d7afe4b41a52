"""Request migration: a stream whose attention worker dies goes on on another worker.

The ingress keeps what the client of each stream has got (`StreamProgress`). When the worker
streaming a request dies (its replica or node gone, or its engine loop dead), the request is
sent again, to another worker, with a `Resume` of that progress; the new engine continues from
there (`replicas/engine/resume.py`) and its deltas carry on the client's stream. Draws are keyed
by (seed, position), so greedy and seeded requests get exactly the tokens an uninterrupted run
gives; an unseeded request is given a seed here, before its first submission, for the same
reason. Its prompt went out in the first delta: resumed deltas drop it.

Bounded: a request moves at most `migration_limit` times (0 turns migration off), after a
short, growing pause each time (Serve drops a dead replica from its routing when a call to it
fails, and a node's death takes Ray a moment to notice). A moved request that finds every
other worker's queue full tries again the same way; a new one gets its 429 as before. Only
one-completion requests move (n = 1); an RSA run does not (its calls and their rounds live in
one engine).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.resume import Resume

FIRST_PAUSE_S = 0.25
MAX_PAUSE_S = 4.0


def movable(params: SamplingParams, limit: int) -> bool:
    return limit > 0 and params.n == 1


def seeded(params: SamplingParams) -> SamplingParams:
    """`params` with a seed: its own, or one drawn here (a moved request draws the same)."""
    if params.seed is not None or params.greedy:
        return params
    return dataclasses.replace(params, seed=random.getrandbits(63))


def pause_s(moves: int) -> float:
    """The pause before a request's `moves`-th move (1-based)."""
    return float(min(MAX_PAUSE_S, FIRST_PAUSE_S * 2 ** (moves - 1)))


class StreamProgress:
    """What the client of one stream (n = 1) has got: its output tokens, the characters of
    text, the cumulative logprob; and whether any delta came (the prompt went with it)."""

    __slots__ = ("tokens", "chars", "cumulative_logprob", "started", "moves")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.chars = 0
        self.cumulative_logprob = 0.0
        self.started = False
        self.moves = 0

    def add(self, delta: StepDelta) -> StepDelta:
        """Counts a delta on its way to the client; a resumed stream's lose the prompt."""
        if self.moves and self.started:
            delta.prompt_token_ids = delta.prompt_logprobs = None
        self.started = True
        for c in delta.completions:
            self.tokens.extend(c.token_ids)
            self.chars += len(c.text)
            if c.cumulative_logprob is not None:
                self.cumulative_logprob = c.cumulative_logprob
        return delta

    def resume(self) -> Resume | None:
        """The resume of the next submission: None before the first delta (the request goes
        again as it was: its client has nothing yet)."""
        if not self.started:
            return None
        return Resume(tuple(self.tokens), self.chars, self.cumulative_logprob)


OUTCOMES = ("moved", "resumed", "failed")


@dataclasses.dataclass
class MigrationCounts:
    """An ingress replica's migrations since it started, by outcome. The replica reports them
    to the placement controller, which sums every replica's (`IngressTotals`) for /metrics."""

    moved: int = 0  # a request sent again to another worker
    resumed: int = 0  # a moved request that then finished
    failed: int = 0  # a request that could not move on (limit reached, or not movable)

    def plus(self, other: MigrationCounts) -> MigrationCounts:
        return MigrationCounts(*(getattr(self, o) + getattr(other, o) for o in OUTCOMES))

    def at_least(self, other: MigrationCounts) -> MigrationCounts:
        """Field by field the larger: counts only grow, so a report that arrives late and
        older than the last one changes nothing."""
        return MigrationCounts(*(max(getattr(self, o), getattr(other, o)) for o in OUTCOMES))

    def samples(self) -> dict[str, Any]:
        return {"request_migrations_total": [
            {"outcome": outcome, "value": getattr(self, outcome)} for outcome in OUTCOMES]}
