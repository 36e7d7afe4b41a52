"""Shared fixtures: small ZAYA configs built in transformers and saved as real checkpoints."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from cluster_harness import MAX_TOKENS as CLUSTER_MAX_TOKENS
from cluster_harness import PROMPTS as CLUSTER_PROMPTS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """The built-in tiny preset, written once per session."""
    from zayaserve.replicas.model.builtin.random_checkpoint import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def engine_client(tiny_checkpoint: Any) -> Iterator[Any]:
    """A LocalEngineClient on the tiny checkpoint (the front ends' tests), one per module."""
    from openai_helpers import make_engine_client

    client = make_engine_client(str(tiny_checkpoint))
    yield client
    client.engine.shutdown()


@pytest.fixture(scope="module")
def server(engine_client: Any) -> Iterator[Any]:
    """The REST app over the module's `engine_client` (a module may override that fixture),
    served by uvicorn on a free port."""
    from openai_helpers import Server

    from zayaserve.cluster.frontend.openai_api import build_openai_app

    s = Server(build_openai_app(engine_client))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray
    from ray import serve

    # address="local": a Ray of this session's own, never one another process left running.
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", num_cpus=4,
             log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def offline() -> dict[str, list[int]]:
    """Greedy outputs of the offline engine: the truth every path must reproduce."""
    from zayaserve import LLM, SamplingParams
    from zayaserve.replicas.model.checkpoint_paths import resolve_model

    llm = LLM(model=str(resolve_model("tiny")))
    params = SamplingParams(temperature=0, max_tokens=CLUSTER_MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(CLUSTER_PROMPTS, params)
    chat = llm.chat([{"role": "user", "content": CLUSTER_PROMPTS[0]}], params)
    result = {p: o.outputs[0].token_ids for p, o in zip(CLUSTER_PROMPTS, outs, strict=True)}
    result["__chat__"] = chat[0].outputs[0].token_ids
    result["__chat_text__"] = chat[0].outputs[0].text  # type: ignore[assignment]
    return result


@pytest.fixture(scope="session")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """What ships, installed as a user installs it: the wheel, non-editable, no extras, in a
    fresh venv; commands run outside the checkout (tests/plain_venv.py)."""
    import shutil

    from plain_venv import install_plain

    installed = install_plain(tmp_path_factory.mktemp("plain"))
    try:
        yield installed
    finally:
        shutil.rmtree(installed.venv, ignore_errors=True)  # ~1.5 GB; pytest keeps tmp dirs


def pytest_configure(config: pytest.Config) -> None:
    # The models under test are tiny: one intra-op thread avoids OpenMP spin contention on a
    # shared 2-core machine (and with Ray worker processes).
    import torch

    torch.set_num_threads(1)
