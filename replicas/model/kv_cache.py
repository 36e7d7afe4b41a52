"""Storage for paged K/V and the per-sequence CCA states of every layer.

K/V live in flat slot arrays (`block * block_size + offset`); which blocks a sequence owns is
the engine's business (block tables). CCA states are not recomputable from K/V, so each running
sequence also owns a state slot: the conv tail of pre-conv q|k and the delayed-v of its last
token, for every layer.
"""

from __future__ import annotations

import torch

from zayaserve.replicas.model.config import ZayaConfig


class KVCache:
    def __init__(
        self,
        config: ZayaConfig,
        num_blocks: int,
        block_size: int,
        num_state_slots: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        snapshots: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_state_slots = num_state_slots
        # One block and one state slot past the end that no sequence owns: padding rows of a
        # graph-replayed decode step write there.
        self.scratch_block = num_blocks
        self.scratch_state_slot = num_state_slots
        num_blocks += 1
        num_state_slots += 1
        num_layers = config.num_hidden_layers
        slots = num_blocks * block_size
        kv_shape = (slots, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # [L, slots, K, C] and [L, slots, Dv]; the initial v state is per layer (the delayed
        # projection of a zero vector, i.e. its bias), set by the model on reset.
        self.conv_state = torch.zeros(
            num_layers, num_state_slots, config.conv_state_len, config.conv_channels,
            dtype=dtype, device=device)
        self.v_state = torch.zeros(
            num_layers, num_state_slots, config.v_state_size, dtype=dtype, device=device)
        self.initial_v_state = torch.zeros(num_layers, config.v_state_size, dtype=dtype,
                                           device=device)
        # Prefix caching: the CCA states at the end of every full block, indexed by block, so
        # a sequence can resume exactly at a cached block boundary ([L, blocks, K, C], [L, ...]).
        self.conv_snap: torch.Tensor | None = None
        self.v_snap: torch.Tensor | None = None
        if snapshots:
            self.conv_snap = torch.zeros(num_layers, num_blocks, config.conv_state_len,
                                         config.conv_channels, dtype=dtype, device=device)
            self.v_snap = torch.zeros(num_layers, num_blocks, config.v_state_size, dtype=dtype,
                                      device=device)

    def reset_state(self, slot: int) -> None:
        """A fresh sequence starts from zero conv history and the bias-only delayed v."""
        self.conv_state[:, slot].zero_()
        self.v_state[:, slot] = self.initial_v_state

    def restore_state(self, slot: int, block: int) -> None:
        """A sequence resuming after a cached block starts from that block's end state."""
        assert self.conv_snap is not None and self.v_snap is not None
        self.conv_state[:, slot] = self.conv_snap[:, block]
        self.v_state[:, slot] = self.v_snap[:, block]

    def copy_state(self, src: int, dst: int) -> None:
        self.conv_state[:, dst] = self.conv_state[:, src]
        self.v_state[:, dst] = self.v_state[:, src]

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        for k, v in zip(self.k, self.v, strict=True):
            k[dst * bs:(dst + 1) * bs] = k[src * bs:(src + 1) * bs]
            v[dst * bs:(dst + 1) * bs] = v[src * bs:(src + 1) * bs]

    @staticmethod
    def bytes_per_block(config: ZayaConfig, block_size: int, dtype: torch.dtype,
                        snapshots: bool = False) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        kv = 2 * config.num_hidden_layers * block_size * config.kv_size * elem
        snap = config.num_hidden_layers * (
            config.conv_state_len * config.conv_channels + config.v_state_size) * elem
        return kv + (snap if snapshots else 0)
