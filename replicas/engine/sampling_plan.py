"""What a batch of sampling rows asks for, worked out once and reused while the batch stays the
same: in steady decode the engine hands the sampler the same cached `SamplingRow` objects step
after step (step_sampling.py), so the per-row Python (which rows are greedy, which use top-p,
temperatures, seed keys, logprob counts) runs only when the batch's membership changes: the
persistent-batch idea of vLLM's input batch, for the sampler's inputs.

The plan is keyed by the rows' identity (rows are immutable); one plan is kept per thread.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zayaserve.replicas.engine.sampler import SamplingRow


@dataclass(frozen=True, slots=True)
class SamplingPlan:
    rows: tuple[SamplingRow, ...]
    greedy: list[int]
    random: list[int]
    any_bans: bool
    any_penalties: bool
    wants: list[int]  # rows that asked for logprob dicts
    wanted_k: list[int]  # and how many each
    seed_keys: list[int]  # of the random rows, in order


_local = threading.local()


def plan_for(rows: Sequence[SamplingRow]) -> SamplingPlan:
    """The plan of `rows`: the last one built on this thread if the rows are the same objects."""
    last: SamplingPlan | None = getattr(_local, "plan", None)
    if last is not None and len(last.rows) == len(rows) and all(
            map(operator.is_, last.rows, rows)):
        return last
    plan = _build(tuple(rows))
    _local.plan = plan
    return plan


def _build(rows: tuple[SamplingRow, ...]) -> SamplingPlan:
    greedy = [i for i, r in enumerate(rows) if r.is_greedy]
    random = [i for i, r in enumerate(rows) if not r.is_greedy]
    wants = [i for i, r in enumerate(rows) if r.num_logprobs is not None]
    return SamplingPlan(
        rows, greedy, random, any(r.banned_token_ids for r in rows),
        any(r.repetition_penalty != 1.0 or r.presence_penalty != 0.0
            or r.frequency_penalty != 0.0 for r in rows),
        wants, [rows[i].num_logprobs or 0 for i in wants], [rows[i].seed_key for i in random])
