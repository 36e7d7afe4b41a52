"""The errors a checkpoint read raises; every message names the file and tensor."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be read as asked; the message names the file and tensor."""


class MissingTensorError(CheckpointError):
    """The requested tensor is not in the checkpoint."""


class TensorShapeError(CheckpointError):
    """A tensor's stored shape differs from what the caller expects, or rows are out of range."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file or index is malformed or truncated."""
