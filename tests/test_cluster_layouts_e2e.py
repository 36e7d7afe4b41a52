"""The disaggregated cluster on a real local Ray Serve, in two more layouts: experts not
replicated (each shard holds only its own; a crash waits for Serve's restart) and two attention
workers behind the prefix-aware request router."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from cluster_harness import MAX_TOKENS, PROMPTS, Cluster, deploy, offline_texts, undeploy

from zayaserve.replicas.model.checkpoint_paths import resolve_model

pytestmark = pytest.mark.e2e

# ---- experts not replicated ----------------------------------------------------------------


@pytest.fixture(scope="module")
def unreplicated(ray_session: None) -> Iterator[Cluster]:
    cluster = deploy(expert_shards=2, expert_replication=1)
    yield cluster
    undeploy()


def test_shards_hold_only_their_experts(unreplicated: Cluster) -> None:
    from zayaserve.replicas.model.config import ZayaConfig

    cfg = ZayaConfig.from_pretrained(resolve_model("tiny"))
    infos = unreplicated.shard_infos()
    held = [sorted(i.experts) for i in infos]
    assert sorted(e for h in held for e in h) == list(range(cfg.num_experts))  # a partition
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4 * cfg.num_hidden_layers
    for info, experts in zip(infos, held, strict=True):
        assert 0 < len(experts) < cfg.num_experts
        assert info.expert_bytes == len(experts) * per_expert


def test_unreplicated_shard_crash_waits_for_restart(unreplicated: Cluster, offline: dict):
    want = offline_texts(offline)
    victim = unreplicated.shard_infos()[0].pid

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=unreplicated.base + "/v1", api_key="x",
                                     max_retries=0, timeout=300)

        async def one(prompt: str) -> str:
            stream = await aclient.completions.create(
                model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            parts = []
            async for chunk in stream:
                parts.append(chunk.choices[0].text)
                if len(parts) == 2 and prompt == PROMPTS[0]:
                    os.kill(victim, signal.SIGKILL)
            return "".join(parts)

        return await asyncio.gather(*(one(p) for p in PROMPTS))

    for prompt, text in zip(PROMPTS, asyncio.run(run()), strict=True):
        assert text == want[prompt]


# ---- two attention workers: prefix-aware routing -------------------------------------------


@pytest.fixture(scope="module")
def routed(ray_session: None, unreplicated: Cluster) -> Iterator[Cluster]:
    del unreplicated
    undeploy()
    cluster = deploy(expert_shards=1, attention_workers=2)
    yield cluster
    undeploy()


def test_requests_sharing_a_prefix_land_on_the_worker_that_has_it(routed: Cluster) -> None:
    """4 prefixes x (1 + 3 followers): with prefix-aware routing every follower finds its
    prefix in the L1 cache of the worker it lands on (random routing over 2 workers would send
    about half of them to the other worker, which has nothing cached yet)."""
    prefix_tokens, followers = 64, 3
    with httpx.Client(timeout=120) as http:
        for p in range(4):
            prefix = [300 + 7 * p + i % 5 for i in range(prefix_tokens)]
            for f in range(1 + followers):
                r = http.post(routed.base + "/v1/completions", json={
                    "model": "tiny", "prompt": prefix + [10 + f] * 5, "max_tokens": 2,
                    "temperature": 0})
                assert r.status_code == 200, r.text
    from ray import serve

    ctl = serve.get_deployment_handle("PlacementController", app_name="zayaserve")
    expected = 4 * followers * prefix_tokens
    deadline = time.time() + 20
    hits = 0.0
    while time.time() < deadline:  # workers report their stats every second
        hits = ctl.stats.remote().result().get("prefix_cache_local_hit_tokens", 0)
        if hits >= expected:
            break
        time.sleep(0.5)
    assert hits == expected
