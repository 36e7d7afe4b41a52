"""Random ZAYA1 checkpoints in the transformers `ZayaForCausalLM` layout, for tests and benchmarks.

Weights at the usual std 0.02 give a model whose every prompt continues with the same token, so
tests could not tell a correct engine from a broken one. Here every parameter is drawn so that it
visibly changes the output: linear maps keep activations at unit scale, norms and residual
scales sit around 1 with real spread, the QK-norm temperature is positive (transformers inits
it to zero, which turns attention into a plain average) and the MoE gate's skip class wins for a
minority of tokens.

Each tensor comes from its own generator seeded by (seed, name), so the writer can go shard by
shard in any order and `randomize_hf_model_` produces exactly the same values in a live
transformers model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from zayaserve.replicas.devtools.tokenizer_train import write_tokenizer_files
from zayaserve.replicas.model.checkpoint_io import INDEX_FILE, SINGLE_FILE, CheckpointReader
from zayaserve.replicas.model.config import DEFAULT_ROPE, ZayaConfig

DEFAULT_SCALE = 0.4  # `initializer_range` of the generated configs; deviations scale with it
DEFAULT_SHARD_BYTES = 2 * 1024**3

# The balancing biases are added to gate probabilities. The skip class gets a head start that
# makes roughly a fifth of tokens skip the experts; with the gate gains below, the winning
# expert's probability leads the skip class's by ~0.2 at the 20% quantile for 8 to 16 experts.
_SKIP_BIAS = 0.2
_BALANCE_STD = 0.01
# Extra gain where a unit-gain map would leave a path too weak to matter: attention averages its
# values, an expert's output is multiplied by its gate probability, and gate logits need a
# real spread for the choice of expert to depend on the token.
_GAINS = {"self_attn.o_proj.weight": 2.0, "experts.down_proj": 3.0,
          "router_mlp.out_proj.weight": 4.0}


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

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if cfg["dtype"] not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {cfg['dtype']!r}")
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


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def init_tensor(name: str, shape: Sequence[int], *, seed: int = 0,
                scale: float = DEFAULT_SCALE) -> torch.Tensor:
    """The random float32 value of checkpoint tensor `name` (same for writer and HF model).

    `scale` is the embedding std; every other spread is proportional to scale / 0.4, so smaller
    scales move all parameters toward the identity-like transformers defaults.
    """
    shape = tuple(int(d) for d in shape)
    noise = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    rel = scale / DEFAULT_SCALE
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
        return noise.mul_(scale)  # in place: the 8B embedding is 2 GB in float32
    if leaf == "balancing_biases":
        noise = noise * (_BALANCE_STD * rel)
        noise[-1] += _SKIP_BIAS
        return noise
    if leaf == "temp":
        # Key temperature of the QK-norm: must stay positive, zero would flatten attention.
        return torch.exp(0.25 * rel * noise)
    if leaf.endswith("_scale") or name.endswith("norm.weight"):
        return 1.0 + 0.1 * rel * noise
    if leaf.endswith("_bias") or leaf == "bias":
        return 0.05 * rel * noise
    if ".experts." in name and leaf in ("gate_up_proj", "down_proj"):
        fan_in = shape[-1]
    elif leaf == "weight" and len(shape) >= 2:
        fan_in = math.prod(shape[1:])  # linear [out, in] and conv [out, in/groups, kernel]
    else:
        raise ValueError(f"no initialisation rule for parameter {name!r} {shape}")
    # Unit-gain maps keep activations O(1) through the residual stream at the default scale.
    gain = next((g for suffix, g in _GAINS.items() if name.endswith(suffix)), 1.0)
    weight = noise.mul_(gain * rel / math.sqrt(fan_in))
    if name.endswith("router_mlp.out_proj.weight"):
        # Tie the skip-class logit near the mean expert logit: a free row gives it a random
        # per-layer offset, so some layers would never skip and others would skip half the time.
        # Near the mean, skipping wins where the gate is unsure, at a rate _SKIP_BIAS sets.
        weight[-1] = weight[:-1].mean(0) + 0.3 * weight[-1]
    return weight


@torch.no_grad()
def randomize_hf_model_(model: torch.nn.Module, seed: int = 0,
                        scale: float = DEFAULT_SCALE) -> None:
    """Overwrite every weight and persistent buffer of a transformers `ZayaForCausalLM` in place
    with the values `init_checkpoint` would write for the same config and seed."""
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:  # tied lm_head shares the embedding's storage
            continue
        seen.add(tensor.data_ptr())
        tensor.copy_(init_tensor(name, tensor.shape, seed=seed, scale=scale))


@torch.no_grad()
def restore_hf_balancing_biases_(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Reload every MoE gate's `balancing_biases` from `checkpoint` into a transformers model.

    transformers 5.23 `ZayaForCausalLM.from_pretrained` re-runs the gate's init after loading,
    which writes -1.0 into the skip class's bias (a plain index assignment the loaded-tensor guard
    does not cover), so a loaded model never skips. Call this after `from_pretrained`.
    """
    with CheckpointReader(checkpoint) as reader:
        for name, buf in model.named_buffers():
            if name.endswith("balancing_biases"):
                buf.copy_(reader.read(name, expect_shape=tuple(buf.shape), dtype=buf.dtype))


def _plan_shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    filled = 0
    for name, nbytes in sizes.items():
        if shards[-1] and filled + nbytes > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    return shards


def _tensor_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    # The gates' balancing biases are a float32 buffer whatever the model dtype.
    return torch.float32 if name.endswith("balancing_biases") else model_dtype


def init_checkpoint(out_dir: str | Path, preset: str = "tiny", *, seed: int = 0,
                    dtype: str | None = None, overrides: dict[str, Any] | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a random checkpoint folder (config, generation config, weights, tokenizer).

    Weights go shard by shard so memory stays near `max_shard_bytes`; a checkpoint that fits in
    one shard is a single `model.safetensors`, otherwise shards plus an index json.
    """
    cfg = preset_config(preset, dtype=dtype, overrides=overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dtype = _DTYPES[cfg["dtype"]]
    scale = float(cfg.get("initializer_range", DEFAULT_SCALE))

    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_cfg = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")

    shapes = checkpoint_shapes(cfg)
    sizes = {n: math.prod(s) * _tensor_dtype(n, model_dtype).itemsize for n, s in shapes.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # a rewrite with fewer shards must not leave old ones
    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards):
        file_name = (SINGLE_FILE if len(shards) == 1
                     else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
        tensors = {n: init_tensor(n, shapes[n], seed=seed, scale=scale)
                   .to(_tensor_dtype(n, model_dtype)) for n in names}
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file_name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    eos = cfg["eos_token_id"]
    write_tokenizer_files(out, int(cfg["vocab_size"]), int(cfg["bos_token_id"]),
                          int(eos if isinstance(eos, int) else eos[0]),
                          int(cfg["pad_token_id"]), seed=seed)
    return out
