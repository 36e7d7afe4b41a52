"""Shared fixtures: small ZAYA configs built in transformers and saved as real checkpoints."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """The built-in tiny preset, written once per session."""
    from zayaserve.replicas.model.checkpoint_init import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


def pytest_configure(config: pytest.Config) -> None:
    # The models under test are tiny: one intra-op thread avoids OpenMP spin contention on a
    # shared 2-core machine (and with Ray worker processes).
    import torch

    torch.set_num_threads(1)
