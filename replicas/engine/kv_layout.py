"""How long a sequence may be and how many KV blocks the engine allocates, from its config."""

from __future__ import annotations

import torch

from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.model.config import ZayaConfig
from zayaserve.replicas.model.kv_cache import KVCache


def kv_layout(config: EngineConfig, model_config: ZayaConfig,
              dtype: torch.dtype) -> tuple[int, int]:
    """(max_model_len, num_blocks): `num_kv_blocks` if set, else what `kv_cache_memory_gb`
    holds, never more than `max_num_seqs` full-length sequences need. The length is capped so
    that a single sequence always fits, or preemption could never make progress."""
    bs = config.block_size
    max_len = config.max_model_len or model_config.max_position_embeddings
    if max_len > model_config.max_position_embeddings:
        raise ValueError(f"max_model_len: {max_len} exceeds the model's "
                         f"max_position_embeddings {model_config.max_position_embeddings}")
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    else:
        per_block = KVCache.bytes_per_block(model_config, bs, dtype,
                                            snapshots=config.enable_prefix_caching)
        budget_blocks = int(config.kv_cache_memory_gb * 2**30) // per_block
        num_blocks = max(1, min(budget_blocks, config.max_num_seqs * -(-max_len // bs)))
    return min(max_len, num_blocks * bs), num_blocks
