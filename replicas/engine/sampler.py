"""Batched next-token sampling for one engine step.

Each row of the logits matrix is an independent sequence with its own parameters, applied in
vLLM v1's order: bans, then penalties (on the raw logits; greedy rows take the argmax here),
then temperature, min-p, top-k and top-p. Logprobs follow vLLM v1's default "raw" mode: they are
the log-softmax of the model's logits before temperature, banning, penalties, min-p and
top-k/top-p, so they describe the model rather than the sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch

from zayaserve.replicas.engine.logprobs import chunk_rows, logprob_dicts
from zayaserve.replicas.engine.noise import draw, seed_key, uniforms
from zayaserve.replicas.engine.outputs import Logprob
from zayaserve.replicas.engine.params import SAMPLING_EPS
from zayaserve.replicas.engine.penalties import apply_min_p, apply_penalties
from zayaserve.replicas.engine.sampling_plan import plan_for

# How many of a row's most likely tokens to try, in turn, before a full sort for top-p, on a
# vocabulary larger than _FULL_SORT_VOCAB (a smaller one is sorted whole at once).
_NUCLEUS_CANDIDATES = (64, 1024)
_FULL_SORT_VOCAB = 4096


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """Per-row sampling settings for one step.

    ``seed`` keys the row's random draw together with the position it samples (see `noise`):
    the same seed and position always draw the same token from the same distribution,
    whatever else shares the batch. Unseeded requests get a seed from the engine.

    The token ids are read only by the penalties: ``prompt_token_ids`` by a repetition
    penalty, ``output_token_ids`` (generated so far) by all three; rows without penalties may
    leave them empty.
    """

    temperature: float
    top_k: int  # <= 0 means off
    top_p: float  # 1.0 means off
    seed: int
    num_logprobs: int | None  # None: no logprobs for this row
    banned_token_ids: tuple[int, ...] = ()  # e.g. EOS/stop ids while below min_tokens
    min_p: float = 0.0  # 0.0 means off
    repetition_penalty: float = 1.0  # 1.0 means off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()

    seed_key: int = field(init=False, repr=False, compare=False)  # noise.seed_key(seed)

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed_key", seed_key(self.seed))
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_logprobs is not None and self.num_logprobs < 0:
            raise ValueError(f"num_logprobs must be >= 0 or None, got {self.num_logprobs}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1


class SampledToken(NamedTuple):
    token_id: int
    logprob: float  # raw logprob of the chosen token
    logprobs: dict[int, Logprob] | None  # present when the row asked for num_logprobs


class LogitsMask(Protocol):
    """A constraint on some rows' tokens (structured outputs): `apply` sets the tokens those
    rows may not take to -inf, in place."""

    rows: list[int]

    def apply(self, logits: torch.Tensor) -> None: ...


def _apply_bans(logits: torch.Tensor, rows: Sequence[SamplingRow], inplace: bool,
                constrained: frozenset[int] = frozenset()) -> torch.Tensor:
    """Return logits with banned ids at -inf; copies (unless `inplace`) only when some row
    bans something. A `constrained` row (structured output) whose grammar allows nothing but
    banned tokens keeps its grammar's choice: min_tokens cannot make valid output invalid."""
    vocab = logits.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, row in enumerate(rows):
        # Ids beyond the logits (e.g. tokenizer ids past a trimmed vocab) can never be sampled.
        ids = [t for t in row.banned_token_ids if 0 <= t < vocab]
        row_idx.extend([i] * len(ids))
        tok_idx.extend(ids)
    if not tok_idx:
        return logits
    banned = logits if inplace else logits.clone()
    r = torch.tensor(row_idx, dtype=torch.long, device=logits.device)
    t = torch.tensor(tok_idx, dtype=torch.long, device=logits.device)
    touched = torch.unique(r)
    before = banned[touched]  # advanced indexing: a copy
    banned[r, t] = float("-inf")
    dead = torch.isneginf(banned[touched].amax(dim=1))
    if bool(dead.any()):
        for j in dead.nonzero().flatten().tolist():
            i = int(touched[j])
            if i not in constrained or bool(torch.isneginf(before[j].amax())):
                raise ValueError("a row has every token banned or at -inf; nothing can be "
                                 "sampled")
            banned[i] = before[j]
    return banned


def _prefix_keep(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # Mass strictly before each token: a token is kept while the kept set is still short of
    # top_p, which yields the smallest prefix reaching top_p. The first token always survives:
    # a tiny top_p (5e-324 is > 0, so valid) is 0 once in float32, which would keep none.
    before = sorted_probs.cumsum(dim=1) - sorted_probs
    keep = before < top_p.unsqueeze(1)
    keep[:, 0] = True
    return keep


def _sorted_desc(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k largest values, descending (numpy's sort on the CPU: torch's CPU sort and
    topk are several times slower at these sizes)."""
    if k < probs.shape[1]:
        return probs.topk(k, dim=1).values
    if probs.device.type == "cpu":
        ascending = np.sort(probs.numpy(), axis=1)
        return torch.from_numpy(np.ascontiguousarray(ascending[:, ::-1]))
    return probs.sort(dim=1, descending=True).values


def _nucleus_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[R, 1]: each row's top-p nucleus is the tokens at least this likely, the last token of
    the shortest most-likely-first prefix reaching top_p (a token tied with that one is kept
    too, so the nucleus never depends on how a sort orders ties)."""
    vocab = probs.shape[1]
    # On a large vocabulary a full sort per row is by far the most expensive step, and real
    # nuclei are usually a few dozen tokens: look among the top candidates first and widen
    # the search (up to the whole row) only for rows whose nucleus may extend past them.
    tiers = [c for c in _NUCLEUS_CANDIDATES if c < vocab] if vocab > _FULL_SORT_VOCAB else []
    threshold = torch.empty(probs.shape[0], dtype=probs.dtype, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    for cand in (*tiers, vocab):
        vals = _sorted_desc(probs[rows] if len(rows) < probs.shape[0] else probs, cand)
        keep = _prefix_keep(vals, top_p[rows])
        last = keep.sum(dim=1, keepdim=True) - 1  # keep is a prefix of each row
        threshold[rows] = vals.gather(1, last).squeeze(1)
        if cand == vocab:
            break
        rows = rows[keep[:, -1]]  # the nucleus may go on past the candidates
        if rows.numel() == 0:
            break
    return threshold.unsqueeze(1)


def _cut_to_nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> None:
    """Zeroes, in place, each row's tokens outside its top-p nucleus. On the CPU a multiply
    by the mask in numpy (a third of masked_fill's time at 256 x 512)."""
    threshold = _nucleus_threshold(probs, top_p)
    if probs.device.type == "cpu":
        a = probs.numpy()
        np.multiply(a, a >= threshold.numpy(), out=a)
    else:
        probs.masked_fill_(probs < threshold, 0.0)


def _filtered_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Temperature, then min-p and top-k, then top-p; returns unnormalised probs with cut
    tokens at 0. (min-p and top-k are both cuts of the tempered logits, so they commute;
    top-p then works on what they leave, renormalised, as in vLLM v1.)"""
    device = logits.device
    temperatures = [r.temperature for r in rows]
    if len(set(temperatures)) == 1:  # the common case: one temperature for the whole batch
        scaled = logits / temperatures[0]
    else:
        temps = torch.tensor(temperatures, dtype=logits.dtype, device=device)
        scaled = logits / temps.unsqueeze(1)
    vocab = scaled.shape[1]
    apply_min_p(scaled, [r.min_p for r in rows])

    ks = [min(r.top_k, vocab) if r.top_k > 0 else 0 for r in rows]
    if any(ks):
        # Threshold at the k-th largest value, so ties with it survive (as in vLLM).
        k_t = torch.tensor(ks, dtype=torch.long, device=device)
        top_vals = scaled.topk(max(ks), dim=1).values
        kth = top_vals.gather(1, (k_t.clamp(min=1) - 1).unsqueeze(1))
        cut = (scaled < kth) & (k_t > 0).unsqueeze(1)
        scaled = scaled.masked_fill(cut, float("-inf"))

    probs = torch.softmax(scaled, dim=1)

    nucleus = [i for i, r in enumerate(rows) if r.top_p < 1.0]
    if nucleus:
        top_p = torch.tensor([rows[i].top_p for i in nucleus], dtype=probs.dtype, device=device)
        if len(nucleus) == len(rows):  # every row: no gather, no scatter
            _cut_to_nucleus(probs, top_p)
        else:
            idx = torch.tensor(nucleus, dtype=torch.long, device=device)
            sub = probs[idx]
            _cut_to_nucleus(sub, top_p)
            probs[idx] = sub
    return probs


def random_draws(rows: Sequence[SamplingRow], positions: Sequence[int]) -> torch.Tensor:
    """The uniform numbers `sample` draws with, one per non-greedy row in order: computable
    before the logits exist (the engine does it while the forward runs)."""
    plan = plan_for(rows)
    return uniforms(plan.seed_keys, [positions[i] for i in plan.random])


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow],
           mask: LogitsMask | None = None,
           positions: Sequence[int] | None = None,
           draws: torch.Tensor | None = None) -> list[SampledToken]:
    """Pick one next token per row of ``logits`` ([S, V]) using that row's settings; a
    ``mask`` (structured outputs) first limits its rows to the tokens their grammar allows.
    Like bans, the mask shapes the draw, not the reported (raw) logprobs. ``positions``: the
    position each row samples (its draw's counter with the row's seed; 0 when not given);
    ``draws``: their uniform numbers already computed (`random_draws`), one per random row."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [S, V], got shape {tuple(logits.shape)}")
    if logits.shape[0] != len(rows):
        raise ValueError(f"got {len(rows)} rows for logits with {logits.shape[0]} rows")
    if not rows:
        return []
    logits = logits.float()
    plan = plan_for(rows)
    work = logits
    constrained: frozenset[int] = frozenset()
    if mask is not None and mask.rows:
        work = logits.clone()
        mask.apply(work)
        constrained = frozenset(mask.rows)
    if plan.any_bans:
        work = _apply_bans(work, rows, inplace=work is not logits, constrained=constrained)
    if plan.any_penalties:
        # In place only when masking or banning already made a copy: `logits` stays raw.
        work = apply_penalties(work, rows, inplace=work is not logits)
    chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)

    if plan.greedy:
        g = torch.tensor(plan.greedy, dtype=torch.long, device=logits.device)
        chosen[g] = work[g].argmax(dim=1)

    rand = plan.random
    chunk = chunk_rows(logits.shape[1])
    for start in range(0, len(rand), chunk):
        members = rand[start : start + chunk]
        sub_rows = [rows[i] for i in members]
        u = draws[start : start + chunk] if draws is not None else uniforms(
            plan.seed_keys[start : start + chunk],
            [positions[i] for i in members] if positions is not None else [0] * len(members))
        if len(members) == len(rows):  # every row samples: no gather, no scatter
            chosen = draw(_filtered_probs(work, sub_rows), u)
            continue
        idx = torch.tensor(members, dtype=torch.long, device=logits.device)
        chosen[idx] = draw(_filtered_probs(work[idx], sub_rows), u)

    # The chosen token's logprob is needed for every row (cumulative_logprob), but the full
    # [S, V] logprob matrix only for rows that asked for a dict.
    lse = torch.logsumexp(logits, dim=1)
    chosen_lps = logits.gather(1, chosen.unsqueeze(1)).squeeze(1) - lse
    # One device-to-host copy for the ids and their logprobs (float64 holds both exactly).
    host_ids, token_lps = torch.stack([chosen.double(), chosen_lps.double()]).tolist()
    token_ids = [int(t) for t in host_ids]
    dicts: list[dict[int, Logprob] | None] = [None] * len(rows)
    if plan.wants:
        for i, d in zip(plan.wants, logprob_dicts(logits, chosen, plan.wanted_k, plan.wants),
                        strict=True):
            dicts[i] = d
    return [
        SampledToken(t, lp, d) for t, lp, d in zip(token_ids, token_lps, dicts, strict=True)
    ]
