"""The offline `LLM` API tests' fixtures: the module's LLM, and a leak check after every test
of every LLM made with `make_llm`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_api_helpers import _module_llms, _test_llms, assert_idle, make_llm

from zayaserve import LLM


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    yield
    try:
        for llm in _module_llms + _test_llms:
            assert_idle(llm)
    finally:
        _test_llms.clear()


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> Iterator[LLM]:
    llm = make_llm(tiny_checkpoint, keep=True)
    yield llm
    _module_llms.remove(llm)
