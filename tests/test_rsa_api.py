"""Markovian RSA through the REST API (`rsa` and the flat rsa_* fields) on the tiny model in one
process: rounds, usage and cache, seeds, metrics, validation, the queue reserved for a run.
Streaming is in test_rsa_api_streaming.py, gRPC in test_rsa_api_grpc.py, the offline `LLM.rsa`
in test_rsa_api_offline.py, the cluster path (a worker runs the whole run) in
test_cluster_e2e.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai_helpers import Server
from rsa_api_helpers import (
    BLOCK,
    ENGINE_KW,
    LIMITS,
    MODEL,
    PROBLEM,
    RSA,
    _chat,
    engine_client,  # noqa: F401 (fixture)
    server,  # noqa: F401 (fixture)
)
from test_grpc_api import wait_idle

from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.openai_api import build_openai_app
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine

FLAT = {f"rsa_{k}": v for k, v in RSA.items()}


def _stable(response: dict[str, Any]) -> str:
    """The response without what differs per response whatever the seed (id, time)."""
    return json.dumps({k: v for k, v in response.items() if k not in ("id", "created")},
                      sort_keys=True)


def test_rounds_usage_and_cache(server: Server, engine_client: LocalEngineClient) -> None:  # noqa: F811
    r = _chat(server, "rounds", rsa={**RSA, "final_n": 2, "return_population": True})
    assert r.status_code == 200, r.text
    body = r.json()
    info, usage = body["rsa"], body["usage"]
    assert [x["calls"] for x in info["rounds"]] == [4, 4, 2]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["object"] == "chat.completion"
    for key in ("prompt_tokens", "completion_tokens"):
        assert usage[key] == sum(x[key] for x in info["rounds"])
    assert usage["prompt_tokens_details"]["cached_tokens"] == sum(
        x["cached_tokens"] for x in info["rounds"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    tok = engine_client.tokenizer
    prompt = tok.render_chat([{"role": "user", "content": PROBLEM}])[1]
    round0 = info["rounds"][0]
    assert round0["prompt_tokens"] == 4 * len(prompt)
    assert round0["cached_tokens"] >= 3 * (len(prompt) // BLOCK) * BLOCK
    assert info["max_context"] == max(x["max_context"] for x in info["rounds"])
    assert info["max_context"] <= info["max_context_bound"]
    population = info["population"]
    assert [len(texts) for texts in population] == [4, 4, 2]
    assert len(set(population[0])) > 1  # per-call seeds: the traces differ
    assert [c["message"]["content"] for c in body["choices"]] == population[-1]
    wait_idle(engine_client)


def test_seed_reproducible_and_other_seed_differs(server: Server) -> None:  # noqa: F811
    # Each run in its own cache namespace, so even the cached-token figures repeat.
    first, again = (_chat(server, salt, rsa=RSA).json() for salt in ("seed-a", "seed-b"))
    assert _stable(first) == _stable(again)
    other = _chat(server, "seed-c", rsa={**RSA, "seed": 12}).json()
    assert other["choices"][0]["message"] != first["choices"][0]["message"]
    # A request's own seed seeds the run when rsa.seed is not set.
    seeded = _chat(server, "seed-d", seed=11, rsa={k: v for k, v in RSA.items() if k != "seed"})
    assert _stable(seeded.json()) == _stable(first)


def _generated(server: Server) -> float:  # noqa: F811
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "zayaserve_generation_tokens_total"
               and sample.labels.get("endpoint") == "/v1/chat/completions")


def test_metrics_count_every_call(server: Server) -> None:  # noqa: F811
    before = _generated(server)
    body = _chat(server, "metrics", rsa=RSA).json()
    assert _generated(server) - before == body["usage"]["completion_tokens"]


def test_t0_is_a_plain_generation_and_k_is_clamped(server: Server) -> None:  # noqa: F811
    plain = _chat(server, "t0", rsa={**RSA, "t": 0, "final_n": 3}).json()
    assert [x["calls"] for x in plain["rsa"]["rounds"]] == [3]
    assert len(plain["choices"]) == 3
    clamped = _chat(server, "k9", rsa={**RSA, "n": 2, "k": 9}).json()
    assert clamped["rsa"]["k"] == 2 and [x["calls"] for x in clamped["rsa"]["rounds"]] == [2, 2, 1]


def test_flat_aliases(server: Server) -> None:  # noqa: F811
    flat = FLAT
    assert _stable(_chat(server, "flat-a", **flat).json()) == _stable(
        _chat(server, "flat-b", rsa=RSA).json())
    tau = {**{k: v for k, v in flat.items() if k != "rsa_tail_tokens"}, "rsa_tau": 12}
    assert _chat(server, "flat-c", **tau).status_code == 200


@pytest.mark.parametrize(("fields", "param"), [
    ({"rsa": {**RSA, "n": 0}}, "rsa.n"),
    ({"rsa": {**RSA, "bogus": 1}}, "rsa.bogus"),
    ({"rsa": {**RSA, "tail_tokens": 4000}}, "rsa.tail_tokens"),
    ({"rsa": {**RSA, "final_max_tokens": 5000}}, "rsa.final_max_tokens"),
    ({"rsa": {**RSA, "n": 8, "t": 60}}, "rsa"),  # over the server's max_rsa_tokens
    ({"rsa": {**RSA, "n": 9}}, "rsa.n"),  # over its max_rsa_calls_per_round
    ({"rsa": {**RSA, "final_n": 9}}, "rsa.final_n"),
    ({"rsa": {**RSA, "aggregation_template": "no placeholders"}}, "rsa.aggregation_template"),
    ({**FLAT, "rsa_tail_tokens": 4000}, "rsa_tail_tokens"),
    ({"rsa_n": 4, "rsa_nn": 2}, "rsa_nn"),
    ({"rsa_n": 4, "rsa": RSA}, "rsa"),
    ({"rsa": RSA, "temperature": 0.5}, "temperature"),
    ({"rsa": RSA, "max_tokens": 5}, "max_tokens"),
    ({"rsa": RSA, "n": 2}, "n"),
    ({"rsa": RSA, "logprobs": True}, "logprobs"),
    ({"rsa": RSA, "messages": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a"}]}, "messages[1]"),
])
def test_bad_requests_are_400_naming_the_field(server: Server, engine_client: LocalEngineClient,  # noqa: F811
                                               fields: dict[str, Any], param: str) -> None:
    r = _chat(server, "bad", **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith(param)
    assert "Traceback" not in r.text
    wait_idle(engine_client)


@pytest.fixture(scope="module")
def small_queue(tiny_checkpoint: Any) -> Iterator[tuple[Server, LocalEngineClient]]:
    client = LocalEngineClient(AsyncLLMEngine(LLMEngine(EngineConfig(
        model=str(tiny_checkpoint), **ENGINE_KW)), max_pending_requests=6), MODEL)
    server = Server(build_openai_app(client, rsa_limits=LIMITS))  # noqa: F811
    yield server, client
    server.stop()
    client.engine.shutdown()


def test_a_run_that_does_not_fit_the_queue_is_refused_whole(
        small_queue: tuple[Server, LocalEngineClient]) -> None:
    """A round's worth of the queue is reserved before the first call: with 3 of 6 slots
    taken, a run of 4 calls per round is a 429 before any of its calls reaches the engine."""
    server, client = small_queue  # noqa: F811
    engine = client.engine.engine

    async def run() -> tuple[list[int], httpx.Response, float]:
        async with httpx.AsyncClient(timeout=120) as http:
            busy = asyncio.ensure_future(asyncio.gather(*(http.post(
                server.url + "/v1/completions", json={
                    "model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True})
                for _ in range(3))))
            while client.engine.num_pending < 3:
                await asyncio.sleep(0.01)
            queried = engine.stats()["prefix_cache_local_queried_tokens"]
            r = await http.post(server.url + "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": PROBLEM}],
                "rsa": RSA})
            admitted = engine.stats()["prefix_cache_local_queried_tokens"] - queried
            return [x.status_code for x in await busy], r, admitted

    busy, refused, admitted = asyncio.run(run())
    assert busy == [200, 200, 200]
    assert refused.status_code == 429, refused.text
    assert "4 more asked for" in refused.json()["error"]["message"]
    assert admitted == 0  # no call of the run was started
    wait_idle(client)
