"""Random ZAYA1 checkpoints in the transformers `ZayaForCausalLM` layout, for tests and benchmarks.

Weights at the usual std 0.02 give a model whose every prompt continues with the same token, so
tests could not tell a correct engine from a broken one. Here every parameter is drawn so that it
visibly changes the output: linear maps keep activations at unit scale, norms and residual
scales sit around 1 with real spread, the QK-norm temperature is positive (transformers inits
it to zero, which turns attention into a plain average) and the MoE gate's skip class wins for a
minority of tokens.

Each tensor comes from its own generator seeded by (seed, name), so the writer can go shard by
shard in any order and `randomize_hf_model_` produces exactly the same values in a live
transformers model. The presets and the tensor layout are in `checkpoint_presets`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from zayaserve.replicas.model.builtin.presets import (
    DEFAULT_SCALE,
    MODEL_DTYPES,
    checkpoint_shapes,
    preset_config,
)
from zayaserve.replicas.model.builtin.tokenizer_train import write_tokenizer_files
from zayaserve.replicas.model.checkpoint_io import INDEX_FILE, SINGLE_FILE, CheckpointReader

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


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(
        int.from_bytes(digest, "little") & (2**63 - 1))


def init_tensor(name: str, shape: Sequence[int], *, seed: int = 0,
                scale: float = DEFAULT_SCALE, device: str | torch.device = "cpu") -> torch.Tensor:
    """The random float32 value of checkpoint tensor `name` (same for writer and HF model).

    `scale` is the embedding std; every other spread is proportional to scale / 0.4, so smaller
    scales move all parameters toward the identity-like transformers defaults. On another
    device the values come from that device's generator: same rules, other draws.
    """
    shape = tuple(int(d) for d in shape)
    dev = torch.device(device)
    noise = torch.randn(shape, generator=_generator(seed, name, dev), dtype=torch.float32,
                        device=dev)
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
    model_dtype = MODEL_DTYPES[cfg["dtype"]]
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
