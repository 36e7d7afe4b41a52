"""What the RSA API tests share: the problem, the run's parameters, the server's limits, the
tiny engine behind a REST app (module fixtures), and a chat request to it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai_helpers import Server

from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.openai_api import build_openai_app
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.rsa.serving import RSALimits

MODEL = "zaya-tiny"
BLOCK = 4
PROBLEM = "A farmer has 17 sheep and all but 9 run away. How many are left? Explain."
RSA = {"n": 4, "k": 2, "t": 2, "tail_tokens": 12, "round_max_tokens": 16,
       "final_max_tokens": 16, "seed": 11}
LIMITS = RSALimits(max_tokens=200_000, max_calls_per_round=8)
ENGINE_KW: dict[str, Any] = dict(num_kv_blocks=1024, block_size=BLOCK, max_model_len=1024,
                                 enable_prefix_caching=True)


@pytest.fixture(scope="module")
def engine_client(tiny_checkpoint: Any) -> Iterator[LocalEngineClient]:
    client = LocalEngineClient(AsyncLLMEngine(LLMEngine(EngineConfig(
        model=str(tiny_checkpoint), **ENGINE_KW))), MODEL)
    yield client
    client.engine.shutdown()


@pytest.fixture(scope="module")
def server(engine_client: LocalEngineClient) -> Iterator[Server]:
    s = Server(build_openai_app(engine_client, rsa_limits=LIMITS))
    yield s
    s.stop()


def _chat(server: Server, salt: str, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROBLEM}],
            "cache_salt": salt, **fields}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
