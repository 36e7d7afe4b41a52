"""Which shard gets which routed rows in one dispatch (pure; the token router calls it).

Rows are grouped by expert, token order kept within an expert, and all of one expert's rows go
to one copy of it: splitting them over copies would change the batch each copy's matmuls see,
and with it the floating-point result of a row, so answers would stop matching the offline
engine's bit for bit. The copy is the one with the fewest outstanding rows (in flight before
this dispatch plus planned in it); ties take turns per expert, so over many dispatches each
copy of a hot expert (replication, or EPLB's redundant copies) gets its share.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch


def plan_rows(
    pending: torch.Tensor, expert_ids: torch.Tensor,
    copies_of: Callable[[int], list[str]], load_of: Callable[[str], int],
    turns: defaultdict[int, int],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows per address, and the rows of experts with no usable copy right now. `copies_of`:
    an expert's usable addresses; `load_of`: an address's rows in flight; `turns`: per expert,
    the ties broken so far (kept by the caller between dispatches)."""
    ids = expert_ids[pending]
    order = torch.argsort(ids, stable=True)  # token order kept within an expert
    present, counts = torch.unique_consecutive(ids[order], return_counts=True)
    planned: defaultdict[str, int] = defaultdict(int)
    groups: defaultdict[str, list[torch.Tensor]] = defaultdict(list)
    unplaced: list[torch.Tensor] = []
    for expert, rows in zip(present.tolist(), torch.split(pending[order], counts.tolist()),
                            strict=True):
        usable = copies_of(expert)
        if not usable:
            unplaced.append(rows)
            continue
        load = [load_of(a) + planned[a] for a in usable]
        tied = [a for a, x in zip(usable, load, strict=True) if x == min(load)]
        turns[expert] += 1
        address = tied[turns[expert] % len(tied)]
        planned[address] += rows.numel()
        groups[address].append(rows)
    plan = {a: torch.cat(parts) for a, parts in groups.items()}
    return plan, (torch.cat(unplaced) if unplaced else pending[:0])
