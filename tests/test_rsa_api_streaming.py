"""Markovian RSA streamed over REST: progress chunks then the answer, the real `openai` client,
and a client that leaves mid-run aborting every call."""

from __future__ import annotations

import json

import httpx
import openai
from openai_helpers import Server
from rsa_api_helpers import (
    MODEL,
    PROBLEM,
    RSA,
    _chat,
    engine_client,  # noqa: F401 (fixture)
    server,  # noqa: F401 (fixture)
)
from test_grpc_api import wait_idle

from zayaserve.cluster.frontend.engine_client import LocalEngineClient


def test_streaming_progress_then_answer(server: Server) -> None:  # noqa: F811
    whole = _chat(server, "stream-a", rsa=RSA).json()
    chunks = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": [{"role": "user", "content": PROBLEM}],
            "cache_salt": "stream-b", "rsa": RSA, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    progress = [c["rsa_progress"] for c in chunks if c["rsa_progress"]]
    assert all(not c["choices"] for c in chunks if c["rsa_progress"])
    done = [p["calls_done"] for p in progress]
    assert done == sorted(done) and done[-1] == progress[-1]["calls_total"] == 9
    starts: dict[int, int] = {}
    for p in progress:
        starts.setdefault(p["round"], p["calls_done"])
    assert starts == {0: 0, 1: 4, 2: 8}  # a round starts when the one before has finished
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    last = chunks[-1]
    assert last["choices"] == [] and last["rsa"]["rounds"] == whole["rsa"]["rounds"]
    assert last["usage"] == whole["usage"]


def test_openai_client(server: Server) -> None:  # noqa: F811
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROBLEM}],
        extra_body={"rsa": RSA, "cache_salt": "openai"})
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens > 0
    assert reply.model_extra is not None and len(reply.model_extra["rsa"]["rounds"]) == 3
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROBLEM}], stream=True,
        extra_body={"rsa": RSA, "cache_salt": "openai-2"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply.choices[0].message.content


def test_client_disconnect_aborts_every_call(server: Server,  # noqa: F811
                                             engine_client: LocalEngineClient) -> None:  # noqa: F811
    long = {**RSA, "n": 6, "round_max_tokens": 200, "final_max_tokens": 200}
    wait_idle(engine_client)
    engine = engine_client.engine.engine
    queried = engine.stats()["prefix_cache_local_queried_tokens"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": [{"role": "user", "content": PROBLEM}],
            "cache_salt": "gone", "rsa": long, "stream": True,
            "chat_template_kwargs": {}}) as r:
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line)[len("data: "):])
        assert first["rsa_progress"]["calls_total"] == 13
        # Leave once round 0's first call is done (so round 0 has surely been admitted) and
        # its others still run.
        for line in lines:
            if line and json.loads(line[len("data: "):])["rsa_progress"]["calls_done"] >= 1:
                break
    wait_idle(engine_client)  # no running request, every block free
    # Left in round 0: none of the 7 aggregation calls was admitted.
    prompt = engine_client.tokenizer.render_chat([{"role": "user", "content": PROBLEM}])[1]
    admitted = engine.stats()["prefix_cache_local_queried_tokens"] - queried
    assert 0 < admitted <= 6 * len(prompt)
