"""Bounded work per request (REST, tiny model at a 2,048-token context): the request that once
took 45 s and a 506 MB body while /health waited 41 s (8 prompts of 2,040 tokens, n 16, echo,
logprobs 20, prompt_logprobs 20) is a 400 naming the budget before it runs; the largest such
request under the budget completes while /health keeps answering (its latencies printed, the
count of answers during the big one asserted: formatting runs off the event loop); chat's
top_logprobs x n and /tokenize past the context are bounded too."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai_helpers import MODEL

from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.response_budget import (
    DEFAULT_MAX_RESPONSE_LOGPROBS,
    logprob_entries,
)
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.timeout(600)
CONTEXT = 2048
PROMPT_IDS = [(7 * i) % 400 + 20 for i in range(2040)]


@pytest.fixture(scope="module")
def engine_client(tiny_checkpoint: Path) -> Iterator[LocalEngineClient]:
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), num_kv_blocks=1200,
                                    max_model_len=CONTEXT))
    client = LocalEngineClient(AsyncLLMEngine(engine), MODEL)
    yield client
    client.engine.shutdown()


def test_the_reported_request_is_refused_before_it_runs(server) -> None:  # type: ignore[no-untyped-def]
    body = {"model": MODEL, "prompt": [PROMPT_IDS] * 8, "n": 16, "echo": True, "logprobs": 20,
            "prompt_logprobs": 20, "max_tokens": 0}
    t0 = time.monotonic()
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    print(f"\n[budget] the reported request: HTTP {r.status_code} in "
          f"{time.monotonic() - t0:.2f} s")
    assert r.status_code == 400, r.text[:500]
    error = r.json()["error"]
    assert error["param"] == "logprobs" and "max_response_logprobs" in error["message"]
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 16,
        "logprobs": True, "top_logprobs": 20})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "top_logprobs"
    long = httpx.post(f"{server.url}/tokenize", timeout=60,
                      json={"model": MODEL, "prompt": "a b " * 3000})
    assert long.status_code == 400 and long.json()["error"]["param"] == "prompt", long.text


def test_the_largest_request_under_the_budget_leaves_health_answering(server) -> None:  # type: ignore[no-untyped-def]
    n = DEFAULT_MAX_RESPONSE_LOGPROBS // (len(PROMPT_IDS) * 21)
    entries = logprob_entries([len(PROMPT_IDS)], n, 1, CONTEXT, None, None, 20)
    assert entries <= DEFAULT_MAX_RESPONSE_LOGPROBS < logprob_entries(
        [len(PROMPT_IDS)], n + 1, 1, CONTEXT, None, None, 20)
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                t0 = time.monotonic()
                assert client.get(f"{server.url}/health").status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    t0 = time.monotonic()
    try:
        r = httpx.post(f"{server.url}/v1/completions", timeout=600, json={
            "model": MODEL, "prompt": PROMPT_IDS, "n": n, "echo": True, "logprobs": 20,
            "max_tokens": 0})
    finally:
        took = time.monotonic() - t0
        done.set()
        poller.join()
    assert r.status_code == 200, r.text[:500]
    choices = r.json()["choices"]
    assert len(choices) == n and all(len(c["logprobs"]["tokens"]) == len(PROMPT_IDS)
                                     for c in choices)
    print(f"\n[budget] n={n}: {entries:,} logprob entries, {len(r.content) / 1e6:.1f} MB in "
          f"{took:.1f} s; /health answered {len(latencies)} times meanwhile, slowest "
          f"{max(latencies):.3f} s")
    assert len(latencies) >= 2, "/health was not answered while the big request ran"
