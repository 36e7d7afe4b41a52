"""vLLM's sampling extras, batched over the rows that ask for them: the repetition, presence
and frequency penalties, and min-p.

Semantics and order follow vLLM v1 (``apply_penalties``), applied to the logits before
temperature and before greedy's argmax:

- ``repetition_penalty`` (HF/CTRL): every token id seen in the prompt or the output so far has
  its logit divided by the penalty when positive, multiplied by it otherwise;
- then OpenAI's ``logit -= frequency * count + presence * (count > 0)``, counting only the
  generated tokens.

Rows without penalties cost nothing: when none has one, the logits come back untouched and
no [rows, V] work happens. Otherwise the work is sparse: only the entries of token ids that a
penalised row has seen are read and rewritten (there are at most as many as its prompt plus
output tokens), with per-row counts built on the device from one host-to-device copy of the
ids; nothing here scales with the vocabulary, and nothing waits for the device.

min-p (vLLM's ``MinPLogitsProcessor``) cuts the tempered logits of the rows that set it.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from typing import Protocol

import torch

# Cap on a logit raised by a repetition penalty below 1 (a positive logit divided by it): far
# above any real logit, and still finite after the smallest temperature divides it, where +inf
# would turn the row's softmax into NaNs.
_MAX_PENALISED_LOGIT = 1e30


class PenaltyRow(Protocol):
    """What the penalties read from a row (the sampler's ``SamplingRow`` has these)."""

    @property
    def repetition_penalty(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def prompt_token_ids(self) -> Sequence[int]: ...
    @property
    def output_token_ids(self) -> Sequence[int]: ...


def has_penalties(row: PenaltyRow) -> bool:
    return (row.repetition_penalty != 1.0 or row.presence_penalty != 0.0
            or row.frequency_penalty != 0.0)


def apply_penalties(logits: torch.Tensor, rows: Sequence[PenaltyRow],
                    inplace: bool = False) -> torch.Tensor:
    """``logits`` ([S, V] float) with each row's penalties applied.

    Returns ``logits`` itself when nothing is to change; otherwise a copy, or ``logits``
    modified in place when ``inplace`` (and contiguous). Ids outside ``[0, V)`` are ignored.
    """
    members = [i for i, r in enumerate(rows) if has_penalties(r)]
    if not members:
        return logits
    # Host side: per penalised row, its prompt ids (only with a repetition penalty, the one
    # penalty that looks at the prompt) then its output ids, all in one flat list, followed by
    # each row's length, prompt part and batch row: one host-to-device copy carries it all.
    flat: list[int] = []
    lens: list[int] = []
    skips: list[int] = []
    for i in members:
        row = rows[i]
        start = len(flat)
        skip = 0
        if row.repetition_penalty != 1.0:
            flat.extend(row.prompt_token_ids)
            skip = len(flat) - start
        flat.extend(row.output_token_ids)
        lens.append(len(flat) - start)
        skips.append(skip)
    if not flat:  # e.g. the first token of frequency/presence-only rows: nothing seen yet
        return logits
    out = logits if inplace and logits.is_contiguous() else logits.clone(
        memory_format=torch.contiguous_format)
    device, vocab, n, m = out.device, out.shape[1], len(flat), len(members)
    # array -> frombuffer is several times faster than torch.tensor(list) for long lists.
    host = array("q", flat)
    host.extend(lens + skips + members)
    packed = torch.frombuffer(host, dtype=torch.long).to(device)
    ids, lens_t = packed[:n], packed[n:n + m]
    skips_t, batch_row = packed[n + m:n + 2 * m], packed[n + 2 * m:]
    factors = torch.tensor(
        [[rows[i].repetition_penalty, rows[i].frequency_penalty, rows[i].presence_penalty]
         for i in members], dtype=out.dtype, device=device)
    # Valid penalties can leave the float range (1e-300 becomes 0, 1e300 inf): keep them in it.
    info = torch.finfo(out.dtype)
    factors[:, 0].clamp_(info.tiny, info.max)

    row_of = torch.repeat_interleave(torch.arange(m, device=device), lens_t, output_size=n)
    is_output = torch.arange(n, device=device) >= (lens_t.cumsum(0) - lens_t + skips_t)[row_of]
    valid = (ids >= 0) & (ids < vocab)
    # One key per (batch row, token id) entry of the flat [S * V] logits; invalid ids get -1,
    # which matches no real key. Work in key order, where equal keys form runs: the run index
    # of each entry (`run`, < n) lets scatter_add count a key's output occurrences into an
    # [n] buffer rather than a [rows, V] histogram.
    key, order = torch.where(valid, batch_row[row_of] * vocab + ids, -1).sort()
    valid, row_of = valid[order], row_of[order]
    starts = torch.ones_like(valid)
    starts[1:] = key[1:] != key[:-1]
    run = starts.cumsum(0) - 1
    per_run = torch.zeros(n, dtype=out.dtype, device=device)
    count = per_run.scatter_add_(0, run, is_output[order].to(out.dtype))[run]

    flat_out = out.view(-1)
    x = flat_out[key.clamp(min=0)]
    rep, freq, pres = factors[row_of].unbind(1)
    # Every listed id was seen. Rows without a repetition penalty have rep == 1.0, and
    # dividing or multiplying by 1.0 leaves a logit exactly as it was.
    new = torch.where(x > 0, (x / rep).clamp(max=_MAX_PENALISED_LOGIT), x * rep)
    new = new - freq * count
    new = new - pres * (count > 0).to(out.dtype)
    # Entries sharing a key compute the same value, so their duplicate writes agree. Invalid
    # ids (sorted first) rewrite the last entry, valid if any is (else its own value, as is).
    target = torch.where(valid, key, key[-1].clamp(min=0))
    value = torch.where(valid, new, torch.where(valid[-1], new[-1], x[-1]))
    flat_out.index_put_((target,), value)
    return out


def apply_min_p(scaled: torch.Tensor, min_ps: Sequence[float]) -> None:
    """In place: -inf wherever a token's probability is below min_p x its row's top one.

    ``scaled`` holds the tempered logits, one row per entry of ``min_ps`` (0 = off). Compared
    in log space (p_i < min_p * p_max  <=>  s_i < s_max + log(min_p)), which saves a softmax
    over the vocabulary; when every row uses min-p the batch is cut without copies.
    """
    members = [i for i, p in enumerate(min_ps) if p > 0.0]
    if not members:
        return
    device = scaled.device
    log_min_p = torch.tensor([math.log(min_ps[i]) for i in members], dtype=scaled.dtype,
                             device=device).unsqueeze(1)
    if len(members) == len(min_ps):
        scaled.masked_fill_(scaled < scaled.amax(dim=1, keepdim=True) + log_min_p,
                            float("-inf"))
        return
    idx = torch.tensor(members, dtype=torch.long, device=device)
    sub = scaled.index_select(0, idx)
    cut = sub < sub.amax(dim=1, keepdim=True) + log_min_p
    scaled.index_copy_(0, idx, sub.masked_fill_(cut, float("-inf")))
