"""What one model forward needs to know about the sequences packed into it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class StepBatch:
    """A flat, unpadded batch: the new tokens of S sequences laid end to end (T tokens).

    Sequence s contributes tokens `query_start[s]:query_start[s+1]`, at absolute positions
    `context_lens[s] - query_lens[s] ... context_lens[s] - 1`.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    token_seq: torch.Tensor  # [T] int64, which sequence each token belongs to
    query_start: torch.Tensor  # [S+1] int64
    query_lens: list[int]  # [S]
    context_lens: list[int]  # [S] tokens in the cache after this step
    slot_mapping: torch.Tensor  # [T] int64, flat KV-cache slot of each new token
    block_tables: torch.Tensor  # [S, max_blocks] int64 (padding -1)
    state_slots: torch.Tensor  # [S] int64, CCA state slot of each sequence
    logits_indices: torch.Tensor  # [L] int64, token rows whose logits are wanted
    # Prefix caching: token rows that complete a block, and that block: the CCA states after
    # these tokens are kept with the block.
    snapshot_rows: torch.Tensor | None = None  # [P] int64
    snapshot_blocks: torch.Tensor | None = None  # [P] int64
    # Per-step derived values (gather indices, attention plans) shared by all layers.
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @staticmethod
    def build(
        chunks: list[tuple[list[int], int, list[int], int]],
        block_size: int,
        logits_rows: list[int],
        device: torch.device | str = "cpu",
        snapshots: list[tuple[int, int]] | None = None,
    ) -> StepBatch:
        """chunks: per sequence (new token ids, start position, block table, state slot)."""
        ids: list[int] = []
        positions: list[int] = []
        token_seq: list[int] = []
        slots: list[int] = []
        starts = [0]
        for s, (tokens, start, table, _) in enumerate(chunks):
            n = len(tokens)
            ids.extend(tokens)
            pos = range(start, start + n)
            positions.extend(pos)
            token_seq.extend([s] * n)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
            starts.append(starts[-1] + n)
        width = max((len(c[2]) for c in chunks), default=0)
        tables = [b for c in chunks for b in c[2] + [-1] * (width - len(c[2]))]
        snap_rows = [r for r, _ in snapshots or ()]
        snap_blocks = [b for _, b in snapshots or ()]
        states = [c[3] for c in chunks]
        # Every index goes over in one host-to-device copy (from pinned memory on a GPU).
        parts = [ids, positions, token_seq, starts, slots, tables, states, logits_rows,
                 snap_rows, snap_blocks]
        host = torch.tensor([v for part in parts for v in part], dtype=torch.int64,
                            device="cpu")
        target = torch.device(device)
        if target.type != "cpu":
            host = host.pin_memory().to(target, non_blocking=True)
        views = torch.split(host, [len(part) for part in parts])
        return StepBatch(
            input_ids=views[0],
            positions=views[1],
            token_seq=views[2],
            query_start=views[3],
            query_lens=[len(c[0]) for c in chunks],
            context_lens=[c[1] + len(c[0]) for c in chunks],
            slot_mapping=views[4],
            block_tables=views[5].reshape(len(chunks), width),
            state_slots=views[6],
            logits_indices=views[7],
            snapshot_rows=views[8] if snapshots else None,
            snapshot_blocks=views[9] if snapshots else None,
        )
