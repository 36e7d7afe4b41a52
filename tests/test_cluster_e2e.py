"""The disaggregated cluster on a real local Ray Serve: attention workers, expert shards over
gRPC, the OpenAI REST front end and the public gRPC API — against the offline `LLM`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from cluster_harness import (
    MAX_TOKENS,
    PROMPTS,
    Cluster,
    Load,
    deploy,
    offline_texts,
    replica_actors,
    undeploy,
    wait_for,
    worker_stats_when_idle,
)

from zayaserve.replicas.model.checkpoint_paths import resolve_model

pytestmark = pytest.mark.e2e

# ---- replicated experts: REST/gRPC equality and surviving a shard crash ----------------------


@pytest.fixture(scope="module")
def replicated(ray_session: None) -> Iterator[Cluster]:
    cluster = deploy(expert_shards=2, expert_replication=2, max_pending_requests=6)
    yield cluster
    undeploy()


def test_rest_stream_and_nonstream_equal_offline(replicated: Cluster, offline: dict) -> None:
    want = offline_texts(offline)

    async def run() -> list[tuple[str, str, str]]:
        aclient = openai.AsyncOpenAI(base_url=replicated.base + "/v1", api_key="x",
                                     max_retries=0)

        async def one(prompt: str) -> tuple[str, str, str]:
            kw: dict[str, Any] = dict(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"ignore_eos": True})
            full = (await aclient.completions.create(**kw)).choices[0].text
            parts = [c.choices[0].text async for c in await aclient.completions.create(
                stream=True, **kw)]
            return prompt, full, "".join(parts)

        return await asyncio.gather(*(one(p) for p in PROMPTS))

    for prompt, full, streamed in asyncio.run(run()):
        assert full == want[prompt]
        assert streamed == want[prompt]


def test_chat_equals_offline(replicated: Cluster, offline: dict) -> None:
    kw: dict[str, Any] = dict(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                              max_tokens=MAX_TOKENS, temperature=0,
                              extra_body={"ignore_eos": True})
    r = replicated.client.chat.completions.create(**kw)
    assert r.choices[0].message.content == offline["__chat_text__"]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       replicated.client.chat.completions.create(stream=True, **kw))
    assert streamed == offline["__chat_text__"]


def test_grpc_equals_offline(replicated: Cluster, offline: dict) -> None:
    from zayaserve.client import ZayaClient

    client = ZayaClient(f"127.0.0.1:{replicated.cfg.grpc_port}")
    for prompt in PROMPTS:
        result = client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        assert result.completions[0].token_ids == offline[prompt]
        streamed = [t for d in client.stream(prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             ignore_eos=True) for t in d.token_ids]
        assert streamed == offline[prompt]


def test_placement_view_shows_shards_and_their_load(replicated: Cluster) -> None:
    from zayaserve.replicas.model.config import ZayaConfig

    num_experts = ZayaConfig.from_pretrained(resolve_model("tiny")).num_experts
    deadline = time.monotonic() + 60
    while True:  # traffic between two heartbeats of a shard shows as load
        r = httpx.post(replicated.base + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200, r.text
        view = httpx.get(replicated.base + "/v1/cluster/placement", timeout=30).json()
        if sum(view["expert_load"]) > 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    m = replicated.placement()
    assert view["epoch"] == m.epoch == 1 and view["version"] <= m.version
    assert not view["experts_in_workers"] and view["num_experts"] == num_experts
    shards = view["shards"]
    assert [s["state"] for s in shards] == ["serving", "serving"], shards
    held = sorted(e for s in shards for e in s["experts"])
    assert held == sorted(list(range(num_experts)) * 2)  # replication 2
    assert len(view["expert_load"]) == num_experts and sum(view["expert_load"]) > 0
    assert 0 < view["balancedness"] <= 1


def test_five_replicated_shard_kills_under_load_change_nothing(replicated: Cluster,
                                                              offline: dict) -> None:
    """Replication 2: Ray kills a random shard replica five times while 8 greedy streams run;
    Serve restarts each; no request fails and no token changes."""
    import random

    import ray

    rng = random.Random(0)
    with Load(replicated, offline, n=6) as load:  # max_pending_requests=6 on this worker
        wait_for(lambda: load.done >= 4, 120, "the first answers")
        for _ in range(5):
            # (Ray's listing of named actors can come back empty for a moment after a restart.)
            wait_for(lambda: replica_actors("ExpertShard"), 60, "a named shard replica to kill")
            victim = rng.choice(replica_actors("ExpertShard"))
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]),
                     no_restart=True)
            served = load.done
            wait_for(lambda s=served: load.done >= s + 3, 180, "answers after a kill")
            replicated.wait_all_shards()  # Serve restarted it; it re-registered
    assert not load.failures, load.failures[:3]
    assert load.done >= 20


def test_disconnect_frees_blocks_and_overload_is_429(replicated: Cluster) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", replicated.base + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # overload: more concurrent long requests than max_pending_requests=6
    async def flood() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as http:
            async def one() -> int:
                r = await http.post(replicated.base + "/v1/completions",
                                    json={**body, "stream": False, "max_tokens": 60})
                if r.status_code == 429:
                    assert r.json()["error"]["message"]
                return r.status_code
            return await asyncio.gather(*(one() for _ in range(14)))

    codes = asyncio.run(flood())
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    deadline = time.time() + 30
    stats: dict[str, Any] = {}
    while time.time() < deadline:
        from ray import serve

        stats = serve.get_deployment_handle("AttentionWorker", app_name="zayaserve") \
            .stats.remote().result()
        if stats["num_requests_running"] == 0 and \
                stats["kv_blocks_free"] == stats["kv_blocks_total"]:
            break
        time.sleep(0.5)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


# n = 3: a round's reservation fits the half of the queue (max_pending_requests 6) that runs
# may hold.
RSA = {"n": 3, "k": 2, "t": 2, "tail_tokens": 12, "round_max_tokens": 12,
       "final_max_tokens": 12, "seed": 5}


def test_rsa_runs_in_a_worker_and_a_disconnect_aborts_it(replicated: Cluster) -> None:
    def run(salt: str) -> dict[str, Any]:
        r = httpx.post(replicated.base + "/v1/chat/completions", timeout=180, json={
            "model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0]}],
            "rsa": RSA, "cache_salt": salt})
        assert r.status_code == 200, r.text
        return dict(r.json())

    first, again = run("rsa-a"), run("rsa-b")
    assert [x["calls"] for x in first["rsa"]["rounds"]] == [3, 3, 1]
    assert first["usage"]["prompt_tokens"] == sum(x["prompt_tokens"]
                                                  for x in first["rsa"]["rounds"])
    assert first["choices"] == again["choices"]  # seeded: reproducible across runs
    queried = worker_stats_when_idle()["prefix_cache_local_queried_tokens"]
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", replicated.base + "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0]}],
                "rsa": {**RSA, "round_max_tokens": 300, "final_max_tokens": 300},
                "cache_salt": "rsa-gone", "stream": True}) as r:
        assert r.status_code == 200
        first_line = next(line for line in r.iter_lines() if line)
        # The run started: leave in the middle of round 0 (each call makes 300 tokens).
    assert '"calls_done":0' in first_line
    stats = worker_stats_when_idle()
    assert stats["num_requests_running"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    # Aborted in round 0: no aggregation call was ever admitted.
    admitted = stats["prefix_cache_local_queried_tokens"] - queried
    assert 0 < admitted <= first["rsa"]["rounds"][0]["prompt_tokens"]


def test_bad_input_gets_4xx_through_the_cluster(replicated: Cluster) -> None:
    url = replicated.base + "/v1/completions"
    with httpx.Client(timeout=30) as http:
        r = http.post(url, json={"model": "nope", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["message"]
        r = http.post(url, json={"model": "tiny", "prompt": "x", "temperature": -1})
        assert r.status_code == 400 and "temperature" in r.text
        r = http.post(url, json={"model": "tiny", "prompt": [10**7], "max_tokens": 2})
        assert r.status_code == 400 and "prompt" in r.text
        r = http.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400


# ---- unreplicated experts: shards hold only theirs; a crash waits for the restart ----------
