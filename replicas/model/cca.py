"""Compressed Convolutional Attention projection over a flat batch of sequence chunks.

q|k projections are mixed along time by a causal depthwise conv (kernel t0) then a grouped conv
(kernel t1). A chunk continues from the conv state its sequence left behind, so every token's
conv window is gathered from [state; chunk] and both convs are applied to the window at once:
no per-sequence loop, and chunked prefill gives the same result as one long prefill.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zayaserve.replicas.model.batch import StepBatch
from zayaserve.replicas.model.config import ZayaConfig


class ConvParams(nn.Module):
    """Weights of a Conv1d, kept under the checkpoint's names; applied by hand below."""

    def __init__(self, channels: int, in_per_group: int, kernel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, in_per_group, kernel))
        self.bias = nn.Parameter(torch.empty(channels))


class CCAProjection(nn.Module):
    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.config = config
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, config.q_size, bias=bias)
        self.k_proj = nn.Linear(h, config.kv_size, bias=bias)
        self.v_proj_current = nn.Linear(h, config.v_state_size, bias=bias)
        self.v_proj_delayed = nn.Linear(h, config.v_state_size, bias=bias)
        groups = config.num_attention_heads + config.num_key_value_heads
        self.conv_qk_depthwise = ConvParams(config.conv_channels, 1, config.cca_time0)
        self.conv_qk_grouped = ConvParams(
            config.conv_channels, config.conv_channels // groups, config.cca_time1)
        self.groups = groups
        # Filled by fuse_projections(); buffers so .to(device/dtype) moves them too.
        self._fused_weight: torch.Tensor | None
        self._fused_bias: torch.Tensor | None
        self.register_buffer("_fused_weight", None, persistent=False)
        self.register_buffer("_fused_bias", None, persistent=False)

    def fuse_projections(self) -> None:
        """One GEMM instead of four for q, k, v-current and v-delayed (after loading)."""
        mods = (self.q_proj, self.k_proj, self.v_proj_current, self.v_proj_delayed)
        sizes = [m.out_features for m in mods]
        self._fused_weight = torch.cat([m.weight.detach() for m in mods])
        # The separate parameters become views of the fused copy: no memory is doubled.
        for m, w in zip(mods, self._fused_weight.split(sizes), strict=True):
            m.weight.data = w
        if all(m.bias is not None for m in mods):
            self._fused_bias = torch.cat([m.bias.detach() for m in mods])  # type: ignore
            for m, b in zip(mods, self._fused_bias.split(sizes), strict=True):
                m.bias.data = b  # type: ignore[union-attr]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[T, q | k | v_current | v_delayed] for hidden states x [T, H]."""
        if self._fused_weight is None:
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj_current(x),
                              self.v_proj_delayed(x)], dim=-1)
        return F.linear(x, self._fused_weight, self._fused_bias)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        sizes = [cfg.q_size, cfg.kv_size, cfg.v_state_size, cfg.v_state_size]
        return tuple(self.project(x).split(sizes, dim=-1))

    def initial_v_state(self) -> torch.Tensor:
        """Delayed projection of a zero vector: what the first token sees as 'previous'."""
        b = self.v_proj_delayed.bias
        if b is None:
            return torch.zeros(self.config.v_state_size, dtype=self.v_proj_delayed.weight.dtype)
        return b.detach().clone()

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        batch: StepBatch,
        conv_state: torch.Tensor,  # [slots, K, C] (this layer), updated in place
        v_state: torch.Tensor,  # [slots, Dv] (this layer), updated in place
        snapshots: tuple[torch.Tensor, torch.Tensor] | None = None,  # [blocks, K, C], [.., Dv]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        T, S, K = x.shape[0], batch.num_seqs, cfg.conv_state_len
        D, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q, k, v_cur, v_del = self._project(x)  # [T, nq*D], [T, nkv*D], [T, Dv], [T, Dv]

        # Residual paths: q averaged with its repeated k; k is the mean over its q group.
        q_res = (q.view(T, nq, D) + k.view(T, nkv, D).repeat_interleave(nq // nkv, dim=1)) * 0.5
        k_res = q_res.view(T, nkv, nq // nkv, D).mean(dim=2)

        # Lay out [state_s; chunk_s] for every sequence end to end and run both convs over it:
        # a token's causal window never leaves its own sequence's segment.
        slots = batch.state_slots
        idx = batch.cached(("cca", K), lambda: cca_gather_indices(batch, K))
        qk = torch.cat([q, k], dim=-1)  # [T, C]
        ext = torch.cat([conv_state[slots].reshape(S * K, qk.shape[1]), qk], dim=0)
        stream = ext[idx.stream].T.unsqueeze(0)  # [1, C, S*K + T]
        dw = self.conv_qk_depthwise
        gw = self.conv_qk_grouped
        mixed = F.conv1d(F.conv1d(stream, dw.weight, dw.bias, groups=stream.shape[1]),
                         gw.weight, gw.bias, groups=self.groups)[0].T[idx.output]  # [T, C]

        if snapshots is not None and batch.snapshot_rows is not None:
            # States after each block-completing token, for the prefix cache.
            conv_snap, v_snap = snapshots
            snap_idx = batch.cached(("cca_snap", K), lambda: cca_snapshot_indices(batch, K))
            if K > 0:
                conv_snap[batch.snapshot_blocks] = ext[snap_idx]
            v_snap[batch.snapshot_blocks] = v_del[batch.snapshot_rows]
        if K > 0:  # the new conv state: the last K columns of [state; chunk] per sequence
            conv_state[slots] = ext[idx.state]

        query = mixed[:, :cfg.q_size].view(T, nq, D) + q_res
        key = mixed[:, cfg.q_size:].view(T, nkv, D) + k_res

        # v: half from this token, half the delayed projection of the previous token.
        v_prev = torch.cat([v_state[slots], v_del], dim=0)[idx.prev_v]
        v_state[slots] = v_del[batch.query_start[1:] - 1]
        value = torch.cat([v_cur, v_prev], dim=-1).view(T, nkv, D)
        return query, key, value


class CCAIndices(NamedTuple):
    stream: torch.Tensor  # [S*K + T] rows of [states; chunk] in per-sequence order
    output: torch.Tensor  # [T] conv output column of each token
    state: torch.Tensor  # [S, K] rows that become each sequence's next conv state
    prev_v: torch.Tensor  # [T] rows of [v states (S); delayed v (T)] each token's value uses


def cca_gather_indices(batch: StepBatch, K: int) -> CCAIndices:
    """Depends only on the step's layout, so it is computed once and shared by all layers."""
    T, S = batch.num_tokens, batch.num_seqs
    dev = batch.input_ids.device
    seq = batch.token_seq
    first = batch.query_start[:-1]
    local = torch.arange(T, device=dev) - first[seq]  # position within the chunk
    # Stream position of sequence s's segment: its K state columns, then its chunk.
    seg_start = first + torch.arange(S, device=dev) * K  # [S]
    stream = torch.empty(S * K + T, dtype=torch.int64, device=dev)
    if K:
        state_pos = seg_start[:, None] + torch.arange(K, device=dev)[None, :]
        stream[state_pos.reshape(-1)] = torch.arange(S * K, device=dev)
    stream[seg_start[seq] + K + local] = S * K + torch.arange(T, device=dev)
    # A valid conv over the stream shortens it by K: token j of s lands at seg_start + j.
    output = seg_start[seq] + local
    lens = torch.tensor(batch.query_lens, device=dev)
    e_state = lens[:, None] + torch.arange(K, device=dev)[None, :]
    state = torch.where(e_state < K, torch.arange(S, device=dev)[:, None] * K + e_state,
                        S * K + first[:, None] + e_state - K)
    prev_v = torch.where(local == 0, seq, S + torch.arange(T, device=dev) - 1)
    return CCAIndices(stream, output, state, prev_v)


def cca_snapshot_indices(batch: StepBatch, K: int) -> torch.Tensor:
    """[P, K] rows of [states (S*K); chunk (T)]: the last K pre-conv columns up to and
    including each snapshot token, i.e. the conv state a sequence would have right after it."""
    assert batch.snapshot_rows is not None
    rows = batch.snapshot_rows
    seq = batch.token_seq[rows]
    first = batch.query_start[:-1][seq]
    e = (rows - first + 1)[:, None] + torch.arange(K, device=rows.device)[None, :]
    return torch.where(e < K, seq[:, None] * K + e, batch.num_seqs * K + first[:, None] + e - K)


def qk_l2_norm(
    q: torch.Tensor, k: torch.Tensor, temp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalise q/k heads to sqrt(head_dim); scale k by its learned per-KV-head temp."""
    scale = q.shape[-1] ** 0.5
    eps = torch.finfo(q.dtype).eps
    q = q * (scale / q.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
    k = k * (scale / k.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
    return q, k * temp[None, :, None]


__all__ = ["CCAProjection", "ConvParams", "qk_l2_norm"]
