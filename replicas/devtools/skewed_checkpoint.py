"""A random checkpoint whose routers favour some experts: the gates' balancing biases get a
Zipf-shaped head start (expert k: `strength / (k + 1) ** exponent`), so the load over experts is
skewed the way real traffic often is. For EPLB tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from zayaserve.replicas.model.builtin.random_checkpoint import init_checkpoint
from zayaserve.replicas.model.checkpoint_io import SINGLE_FILE


def write_skewed_checkpoint(out_dir: str | Path, preset: str = "tiny", *, seed: int = 0,
                            strength: float = 0.05, exponent: float = 1.0) -> Path:
    out = init_checkpoint(out_dir, preset, seed=seed, max_shard_bytes=2**40)
    weights = out / SINGLE_FILE
    tensors = load_file(str(weights))
    for name, bias in tensors.items():
        if name.endswith("balancing_biases"):
            experts = bias.numel() - 1  # the last class is the skip class: left alone
            for k in range(experts):
                bias[k] += strength / (k + 1) ** exponent
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out
