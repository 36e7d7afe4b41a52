"""Builds the attention side and the expert side from a checkpoint folder.

The attention side never reads an expert tensor; the expert side reads only the rows (experts)
it is given, as slices of the stacked tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zayaserve.replicas.model.attention_side import AttentionSideModel
from zayaserve.replicas.model.checkpoint_errors import MissingTensorError
from zayaserve.replicas.model.checkpoint_io import CheckpointReader
from zayaserve.replicas.model.config import ConfigError, ZayaConfig
from zayaserve.replicas.model.experts import ExpertWeights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, config: ZayaConfig) -> torch.dtype:
    """'auto'/None takes the checkpoint's dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype: unsupported {dtype}; use one of {sorted(DTYPES)}")
        return dtype
    name = (config.dtype or "float32") if dtype in (None, "auto") else dtype
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
            "float": "float32"}.get(str(name), str(name))
    if name not in DTYPES:
        raise ConfigError(f"dtype: unsupported {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def open_weights(model: str | Path, device: str | torch.device = "cpu"
                 ) -> tuple[ZayaConfig, Any]:
    """The config and a reader of a checkpoint folder, or of `random:<preset>[@seed]` weights
    generated on `device` (`builtin.random_weights.RandomWeights`, with CheckpointReader's read
    methods)."""
    if isinstance(model, str) and model.startswith("random:"):
        from zayaserve.replicas.model.builtin.random_weights import RandomWeights

        weights = RandomWeights(model, device)
        return weights.config, weights
    return ZayaConfig.from_pretrained(model), CheckpointReader(model)


def expert_tensor_names(layer: int) -> tuple[str, str]:
    prefix = f"model.layers.{layer}.mlp.experts"
    return f"{prefix}.gate_up_proj", f"{prefix}.down_proj"


def load_attention_side(
    path: str | Path, dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> AttentionSideModel:
    config, reader = open_weights(path, device)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = AttentionSideModel(config)
    model = model.to_empty(device=device)
    tied = config.tie_word_embeddings
    with reader:
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tied and name == "lm_head.weight":
                continue
            # balancing_biases stay fp32: they steer the top-1 choice and must not be rounded.
            want = torch.float32 if name.endswith("balancing_biases") else torch_dtype
            value = reader.read(name, expect_shape=tuple(tensor.shape), dtype=want)
            tensor.data = value.to(device)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    for layer in model.layers:
        layer.self_attn.qkv_proj.fuse_projections()
    return model.eval()


def load_expert_side(
    path: str | Path,
    experts: Sequence[int] | dict[int, Sequence[int]] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> list[ExpertWeights]:
    """Experts of every layer: all of them, the same subset for every layer, or a per-layer map."""
    config, reader = open_weights(path, device)
    torch_dtype = resolve_dtype(dtype, config)
    E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
    layers = []
    with reader:
        for layer in range(config.num_hidden_layers):
            if experts is None:
                chosen = list(range(E))
            elif isinstance(experts, dict):
                chosen = list(experts.get(layer, ()))
            else:
                chosen = list(experts)
            bad = [e for e in chosen if not 0 <= e < E]
            if bad:
                raise ConfigError(f"experts: ids {bad} out of range for num_experts={E}")
            gate_up_name, down_name = expert_tensor_names(layer)
            gate_up = reader.read_rows(gate_up_name, chosen, expect_shape=(E, 2 * I, H),
                                       dtype=torch_dtype)
            down = reader.read_rows(down_name, chosen, expect_shape=(E, H, I), dtype=torch_dtype)
            layers.append(ExpertWeights(chosen, gate_up.to(device), down.to(device)))
    return layers


__all__ = [
    "load_attention_side", "load_expert_side", "resolve_dtype", "MissingTensorError", "DTYPES"]
