"""Raw logprobs (the model's log-softmax, before any sampling setting) of chosen tokens plus
each position's top-k, for sampled tokens and for the prompt (vLLM's `prompt_logprobs`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zayaserve.replicas.engine.outputs import Logprob

# Rows per chunk (here and in the sampler) are chosen so that one [rows, V] float32 temporary
# stays around 64 MiB; a few hundred rows times a 262k vocabulary would otherwise need several
# GiB of scratch (sorting for top-p also allocates int64 indices of the same shape).
_CHUNK_ELEMENTS = 1 << 24


def chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def _raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    # Written as x - logsumexp(x) rather than log_softmax so that the single-token path in
    # sample() (gather, then subtract) produces bit-identical values for the same token.
    return logits - torch.logsumexp(logits, dim=1, keepdim=True)


def logprob_dicts(
    logits: torch.Tensor, token_ids: torch.Tensor, ks: Sequence[int], row_ids: Sequence[int]
) -> list[dict[int, Logprob]]:
    """For each ``row_ids[j]``, a dict of that row's token plus its top-``ks[j]`` logprobs.

    The token comes first in each dict (vLLM's order), then the top-k by descending logprob.
    Rows are gathered a chunk at a time so the [rows, V] logprob scratch stays bounded.
    """
    vocab = logits.shape[1]
    chunk = chunk_rows(vocab)
    dicts: list[dict[int, Logprob]] = []
    for start in range(0, len(row_ids), chunk):
        stop = min(start + chunk, len(row_ids))
        idx = torch.tensor(row_ids[start:stop], dtype=torch.long, device=logits.device)
        lp = _raw_logprobs(logits[idx].float())
        tok = token_ids[idx].to(device=lp.device, dtype=torch.long).unsqueeze(1)
        tok_lp = lp.gather(1, tok)
        tok_rank = (lp > tok_lp).sum(dim=1) + 1
        chunk_ks = ks[start:stop]
        kmax = min(max(chunk_ks), vocab)
        tops: list[list[tuple[int, float, int]]] = [[] for _ in chunk_ks]
        if kmax > 0:
            vals, ids = lp.topk(kmax, dim=1)
            # Any value strictly above a top-k entry is itself in the top-k, so ranks can be
            # counted among the k values instead of over the vocabulary (ties share a rank).
            ranks = (vals.unsqueeze(1) > vals.unsqueeze(2)).sum(dim=2) + 1
            tops = [
                list(zip(i_row, v_row, r_row, strict=True))
                for i_row, v_row, r_row in zip(
                    ids.tolist(), vals.tolist(), ranks.tolist(), strict=True
                )
            ]
        per_row = zip(
            tok.squeeze(1).tolist(),
            tok_lp.squeeze(1).tolist(),
            tok_rank.tolist(),
            chunk_ks,
            tops,
            strict=True,
        )
        for t, t_lp, t_rank, k, top in per_row:
            entry = {t: Logprob(t_lp, t_rank)}
            for tid, value, rank in top[:k]:
                entry.setdefault(tid, Logprob(value, rank))
            dicts.append(entry)
    return dicts


def prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, k: int
) -> list[dict[int, Logprob]]:
    """Raw logprobs of the actual prompt continuation plus the top-k at each position.

    ``logits[i]`` is the prediction made at prompt position ``i`` and ``next_token_ids[i]`` the
    prompt token that actually followed it. The caller prepends ``None`` for the first prompt
    token to build vLLM's ``PromptLogprobs``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [P, V], got shape {tuple(logits.shape)}")
    if next_token_ids.shape != (logits.shape[0],):
        raise ValueError(
            f"next_token_ids must have shape ({logits.shape[0]},), "
            f"got {tuple(next_token_ids.shape)}"
        )
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    positions = range(logits.shape[0])
    return logprob_dicts(logits, next_token_ids, [k] * len(positions), positions)
