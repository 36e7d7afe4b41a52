"""The built-in model presets (`tiny`, `small`, `zaya1-8b`) as transformers config dicts, and the
tensor layout a `ZayaForCausalLM` checkpoint of such a config has."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

from zayaserve.replicas.model.config import DEFAULT_ROPE, ZayaConfig

DEFAULT_SCALE = 0.4  # `initializer_range` of the generated configs; deviations scale with it


def _base(vocab: int, hidden: int, layer_types: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "architectures": ["ZayaForCausalLM"],
        "model_type": "zaya",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": len(layer_types),
        "layer_types": layer_types,
        "hidden_act": "silu",
        "initializer_range": DEFAULT_SCALE,
        "rms_norm_eps": 1e-5,
        "use_cache": True,
        "tie_word_embeddings": True,
        "rope_parameters": copy.deepcopy(DEFAULT_ROPE),
        "attention_dropout": 0.0,
        "num_experts_per_tok": 1,
        "output_router_logits": False,
        "attention_bias": False,
        "lm_head_bias": False,
        "cca_time0": 2,
        "cca_time1": 2,
        "pad_token_id": 0,
        "bos_token_id": 2,
        **extra,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _base(
        512, 64, ["hybrid", "hybrid_sliding"] * 2, sliding_window=16,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        moe_intermediate_size=64, router_hidden_size=32, max_position_embeddings=2048,
        eos_token_id=3, dtype="float32"),
    # About 100M parameters: the benchmark model.
    "small": _base(
        8192, 512, ["hybrid", "hybrid_sliding"] * 4, sliding_window=256,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=16,
        moe_intermediate_size=448, router_hidden_size=128, max_position_embeddings=4096,
        eos_token_id=3, dtype="float32"),
    # The shapes of Zyphra/ZAYA1-8B.
    "zaya1-8b": _base(
        262272, 2048, ["hybrid"] * 40, sliding_window=None,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_experts=16,
        moe_intermediate_size=2048, router_hidden_size=256, max_position_embeddings=131072,
        eos_token_id=106, dtype="bfloat16"),
}

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preset_config(preset: str, *, dtype: str | None = None,
                  overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json dict of a preset, with `overrides` applied and validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    overrides = dict(overrides or {})
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        # Keep the preset's layer pattern when only the depth changes.
        pattern = cfg["layer_types"]
        cfg["layer_types"] = [pattern[i % len(pattern)]
                              for i in range(int(overrides["num_hidden_layers"]))]
    cfg.update(copy.deepcopy(overrides))
    if dtype is not None:
        cfg["dtype"] = dtype
    if cfg["dtype"] not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(MODEL_DTYPES)}, got {cfg['dtype']!r}")
    ZayaConfig.from_dict(cfg, source=f"preset {preset!r}")  # fail here, not in a reader later
    return cfg


def checkpoint_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a transformers `save_pretrained` of this config writes, in layer order."""
    c = ZayaConfig.from_dict(dict(config))
    h, q, kv, r, e, i = (c.hidden_size, c.q_size, c.kv_size, c.router_hidden_size,
                         c.num_experts, c.moe_intermediate_size)
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, h),
        "model.input_hidden_states_scale": (h,),
        "model.input_hidden_states_bias": (h,),
    }
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for block in ("post_attention_residual_scale", "post_mlp_residual_scale"):
            for leaf in ("hidden_states_scale", "hidden_states_bias", "residual_scale",
                         "residual_bias"):
                shapes[f"{p}{block}.{leaf}"] = (h,)
        a = p + "self_attn."
        shapes[a + "o_proj.weight"] = (h, q)
        if c.attention_bias:
            shapes[a + "o_proj.bias"] = (h,)
        shapes[a + "qk_norm.temp"] = (c.num_key_value_heads,)
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj_current", kv // 2),
                           ("v_proj_delayed", kv // 2)):
            shapes[f"{a}qkv_proj.{proj}.weight"] = (rows, h)
            if c.attention_bias:
                shapes[f"{a}qkv_proj.{proj}.bias"] = (rows,)
        ch = c.conv_channels
        shapes[a + "qkv_proj.conv_qk_depthwise.weight"] = (ch, 1, c.cca_time0)
        shapes[a + "qkv_proj.conv_qk_depthwise.bias"] = (ch,)
        shapes[a + "qkv_proj.conv_qk_grouped.weight"] = (ch, c.head_dim, c.cca_time1)
        shapes[a + "qkv_proj.conv_qk_grouped.bias"] = (ch,)
        g = p + "mlp.gate."
        shapes[g + "down_proj.weight"] = (r, h)
        shapes[g + "down_proj.bias"] = (r,)
        if n > 0:
            shapes[g + "router_states_scale"] = (r,)
        shapes[g + "router_mlp.norm.weight"] = (r,)
        for fc in ("fc1", "fc2"):
            shapes[f"{g}router_mlp.{fc}.weight"] = (r, r)
            shapes[f"{g}router_mlp.{fc}.bias"] = (r,)
        shapes[g + "router_mlp.out_proj.weight"] = (e + 1, r)
        shapes[g + "balancing_biases"] = (e + 1,)
        shapes[p + "mlp.experts.gate_up_proj"] = (e, 2 * i, h)
        shapes[p + "mlp.experts.down_proj"] = (e, h, i)
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    if c.lm_head_bias:
        shapes["lm_head.bias"] = (c.vocab_size,)
    return shapes


def count_params(config: Mapping[str, Any] | str) -> int:
    """Stored parameter count (tied embeddings once) of a config dict or preset name."""
    cfg = preset_config(config) if isinstance(config, str) else config
    return sum(math.prod(s) for s in checkpoint_shapes(cfg).values())
