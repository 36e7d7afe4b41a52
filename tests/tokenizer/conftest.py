"""The tokenizer tests' fixtures: tokenizers built once per module by shape."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tokenizer_helpers import _write

from zayaserve.replicas.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], Tokenizer]:
    """Builds each (vocab, eos) shape once per module; the 8192 build takes a second or two."""
    cache: dict[tuple[int, int], Tokenizer] = {}

    def get(vocab: int, eos: int) -> Tokenizer:
        if (vocab, eos) not in cache:
            path = _write(tmp_path_factory.mktemp(f"tok{vocab}"), vocab, eos)
            cache[vocab, eos] = Tokenizer.from_pretrained(path)
        return cache[vocab, eos]

    return get


@pytest.fixture(scope="module")
def tiny(built: Callable[[int, int], Tokenizer]) -> Tokenizer:
    return built(512, 1)


@pytest.fixture(scope="module")
def small(built: Callable[[int, int], Tokenizer]) -> Tokenizer:
    return built(8192, 106)
