"""Random weights of a built-in preset, made directly in device memory: `model="random:zaya1-8b"`
(or `random:<preset>@<seed>`) loads like a checkpoint folder, but every tensor is generated where
it will live, so a full-size benchmark starts in seconds and writes nothing to disk.

The values follow `init_tensor`'s rules. On the CPU they are the ones `init-checkpoint` writes;
a GPU's generator draws others (same distribution, same seed every run on that kind of device).
There is no tokenizer: such a model takes token ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from types import TracebackType

import torch

from zayaserve.replicas.model.builtin.presets import (
    DEFAULT_SCALE,
    PRESETS,
    checkpoint_shapes,
    preset_config,
)
from zayaserve.replicas.model.builtin.random_checkpoint import init_tensor
from zayaserve.replicas.model.checkpoint_errors import MissingTensorError, TensorShapeError
from zayaserve.replicas.model.config import ConfigError, ZayaConfig

PREFIX = "random:"


def is_random(model: object) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def parse(model: str) -> tuple[str, int]:
    """'random:<preset>[@<seed>]' -> (preset, seed), or a ConfigError naming `model`."""
    spec = model.removeprefix(PREFIX)
    preset, _, seed = spec.partition("@")
    if preset not in PRESETS or (seed and not seed.isdigit()):
        raise ConfigError(f"model: {model!r} is not random:<preset>[@<seed>] with a preset in "
                          f"{sorted(PRESETS)} and a non-negative integer seed")
    return preset, int(seed or 0)


class RandomWeights:
    """CheckpointReader's reading interface over generated tensors."""

    def __init__(self, model: str, device: str | torch.device = "cpu") -> None:
        self.model = model
        preset, self.seed = parse(model)
        self.config_dict = preset_config(preset)
        self.config = ZayaConfig.from_dict(self.config_dict, source=model)
        self.shapes = checkpoint_shapes(self.config_dict)
        self.scale = float(self.config_dict.get("initializer_range", DEFAULT_SCALE))
        self.device = torch.device(device)

    def identity(self) -> str:
        """Stands in for a checkpoint's weights hash: what determines the values."""
        return hashlib.sha256(f"{self.model}|{self.device.type}".encode()).hexdigest()

    def read(self, name: str, *, expect_shape: Sequence[int] | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.shapes:
            raise MissingTensorError(f"{self.model}: no tensor {name!r}")
        shape = self.shapes[name]
        if expect_shape is not None and tuple(expect_shape) != shape:
            raise TensorShapeError(f"{self.model}: {name} has shape {shape}, "
                              f"expected {tuple(expect_shape)}")
        value = init_tensor(name, shape, seed=self.seed, scale=self.scale, device=self.device)
        return value if dtype is None else value.to(dtype)

    def read_rows(self, name: str, rows: Sequence[int], *,
                  expect_shape: Sequence[int] | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        full = self.read(name, expect_shape=expect_shape)
        index = torch.tensor(list(rows), dtype=torch.int64, device=self.device)
        picked = full.index_select(0, index)
        return picked if dtype is None else picked.to(dtype)

    def close(self) -> None:
        pass

    def __enter__(self) -> RandomWeights:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
