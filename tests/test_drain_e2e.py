"""A scale-down drains: on a real local Ray Serve, attention workers go 2 -> 1 while 8 greedy
streams of 400 tokens and a seeded RSA run are in flight on both; every stream completes with
the offline engine's text, the RSA run gives the answers it gives undisturbed, and the worker
Serve removed was holding streams when the resize began."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cluster_harness import Cluster, deploy, undeploy, wait_for

pytestmark = pytest.mark.e2e
PROMPTS = [f"Stream {i} of the drain test says" for i in range(8)]
TOKENS = 400
RSA = {"n": 3, "k": 2, "t": 2, "tail_tokens": 12, "round_max_tokens": 60,
       "final_max_tokens": 60, "seed": 7}


@pytest.fixture(scope="module")
def two_workers(ray_session: None) -> Iterator[Cluster]:
    c = deploy(attention_workers=2, expert_shards=0, scale_cooldown_s=0, drain_timeout_s=300,
               engine={"max_num_seqs": 16})
    yield c
    undeploy()


def _offline_texts() -> dict[str, str]:
    from zayaserve import LLM, SamplingParams
    from zayaserve.replicas.model.checkpoint_paths import resolve_model

    llm = LLM(model=str(resolve_model("tiny")))
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=TOKENS,
                                                ignore_eos=True))
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, outs, strict=True)}


def _stream(base: str, prompt: str, texts: dict[str, str], errors: list[str]) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    parts: list[str] = []
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                errors.append(f"{prompt}: {r.status_code} {r.read()[:200]!r}")
                return
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        errors.append(f"{prompt}: {chunk['error']}")
                        return
                    parts.append(chunk["choices"][0]["text"])
    except httpx.HTTPError as err:
        errors.append(f"{prompt}: {err!r}")
        return
    texts[prompt] = "".join(parts)


def _rsa(base: str, out: dict[str, Any]) -> None:
    r = httpx.post(base + "/v1/chat/completions", timeout=600, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Drain, then answer."}],
        "rsa": RSA})
    out["status"], out["body"] = r.status_code, r.json()


def _workers_running() -> dict[str, int]:
    """Each AttentionWorker replica's requests running in its engine (through Serve's private
    replica wrapper: test-only)."""
    import ray
    from ray.util import list_named_actors

    def running(replica: Any) -> int:
        worker = replica._replica_impl._user_callable_wrapper._callable
        return int(worker.engine.engine.stats()["num_requests_running"])

    out = {}
    for a in list_named_actors(all_namespaces=True):
        if "#AttentionWorker#" in a["name"]:
            with contextlib.suppress(Exception):  # a replica stopping meanwhile
                handle = ray.get_actor(a["name"], namespace=a["namespace"])
                out[a["name"]] = int(ray.get(handle.__ray_call__.remote(running), timeout=30))
    return out


def test_scale_down_drains_streams_and_rsa(two_workers: Cluster) -> None:
    want = _offline_texts()
    undisturbed: dict[str, Any] = {}
    _rsa(two_workers.base, undisturbed)
    assert undisturbed["status"] == 200, undisturbed["body"]
    texts: dict[str, str] = {}
    errors: list[str] = []
    rsa: dict[str, Any] = {}
    threads = [threading.Thread(target=_stream, args=(two_workers.base, p, texts, errors))
               for p in PROMPTS] + [threading.Thread(target=_rsa, args=(two_workers.base, rsa))]
    for t in threads:
        t.start()
    wait_for(lambda: len(r := _workers_running()) == 2 and all(r.values()), 120,
             "streams running on both workers")
    before = _workers_running()
    r = httpx.post(two_workers.base + "/v1/cluster/scale", json={"attention_workers": 1},
                   timeout=30)
    assert r.status_code in (200, 202), r.text
    op = r.json()["operation"]["id"]
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert texts == want  # every stream complete, token for token the offline engine's
    assert rsa["status"] == 200, rsa.get("body")
    assert rsa["body"]["choices"] == undisturbed["body"]["choices"]

    def done() -> bool:
        got = httpx.get(f"{two_workers.base}/v1/cluster/operations/{op}", timeout=30).json()
        assert got["phase"] != "failed", got
        return bool(got["phase"] == "done")

    wait_for(done, 300, "the scale-down to finish")
    wait_for(lambda: len(_workers_running()) == 1, 120, "the drained worker to stop")
    after = _workers_running()
    removed = set(before) - set(after)
    assert len(after) == 1 and len(removed) == 1, (before, after)
    assert before[removed.pop()] > 0  # it was holding streams when the resize began
