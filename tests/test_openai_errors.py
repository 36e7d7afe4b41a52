"""The OpenAI-compatible REST front end's models, health and metrics routes, and its errors:
every bad input gets its status and an OpenAI error body naming the field, keys are
checked, a full queue is a 429, and a client that disconnects frees its KV blocks (a real
uvicorn server over LocalEngineClient on the tiny checkpoint)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from openai_helpers import (
    API_KEY,
    CHAT,
    ENGINE_KW,
    MODEL,
    PROMPTS,
    Server,
    httpx,
    make_engine_client,
    wait_idle,
)
from prometheus_client.parser import text_string_to_metric_families

from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.openai_api import build_openai_app


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


# ---- models, health, metrics ------------------------------------------------------------


def test_models_and_health(client: openai.OpenAI, server: Server) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model" and models.data[0].owned_by == "zayaserve"
    assert httpx.get(f"{server.url}/health").status_code == 200


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests(server: Server, client: openai.OpenAI) -> None:
    before = _samples(httpx.get(f"{server.url}/metrics").text)
    client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0)
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and "text/plain" in response.headers["content-type"]
    after = _samples(response.text)
    assert all(name.startswith("zayaserve_") for name, _ in after)
    ok = ("zayaserve_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    assert after[ok] == before.get(ok, 0) + 1
    tokens = ("zayaserve_generation_tokens_total", (("endpoint", "/v1/completions"),))
    assert after[tokens] == before.get(tokens, 0) + 3
    ttft = ("zayaserve_time_to_first_token_seconds_count", (("endpoint", "/v1/completions"),))
    assert after[ttft] == before.get(ttft, 0) + 1
    itl = ("zayaserve_inter_token_latency_seconds_count", (("endpoint", "/v1/completions"),))
    assert after[itl] == before.get(itl, 0) + 2
    assert after[("zayaserve_kv_blocks_total", ())] == ENGINE_KW["num_kv_blocks"]
    assert after[("zayaserve_queue_depth", ())] == 0
    assert after[("zayaserve_engine_stats_up", ())] == 1


# ---- errors -----------------------------------------------------------------------------


def _post(server: Server, path: str, body: Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content,
                      headers={"content-type": "application/json", **kw.pop("headers", {})},
                      timeout=30, **kw)


def _error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if param is not None:
        assert param.split("[")[0].split(".")[0] in error["message"]
    return error  # type: ignore[no-any-return]


COMPLETION_ERRORS = [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "top_k": -5}, "top_k"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 2}, "min_tokens"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": [2, 99999]}, "prompt"),
    ({"prompt": [[2, 3], [99999]]}, "prompt[1]"),
    ({"prompt": "x", "max_tokens": 300}, "max_tokens"),
    ({"prompt": list(range(2, 300))}, "prompt"),
    ({"prompt": "x " * 300}, "prompt"),
]


@pytest.mark.parametrize(("body", "param"), COMPLETION_ERRORS)
def test_completion_bad_input(server: Server, body: dict[str, Any], param: str) -> None:
    _error(_post(server, "/v1/completions", body), 400, param)


CHAT_ERRORS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": CHAT, "max_tokens": 1000}, "max_tokens"),
    ({"messages": CHAT, "tools": []}, "tools"),
    ({"messages": [{"role": "user", "content": "x " * 300}]}, "messages"),
]


@pytest.mark.parametrize(("body", "param"), CHAT_ERRORS)
def test_chat_bad_input(server: Server, body: dict[str, Any], param: str) -> None:
    _error(_post(server, "/v1/chat/completions", body), 400, param)


def test_malformed_json_unknown_model_and_big_body(server: Server) -> None:
    error = _error(_post(server, "/v1/completions", b'{"prompt": "x",'), 400, None)
    assert "JSON" in error["message"]
    _error(_post(server, "/v1/chat/completions", b"[1, 2]"), 400, None)
    error = _error(_post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404,
                   "model")
    assert error["code"] == "model_not_found"
    big = {"prompt": "x", "user": "u" * 1_100_000}
    _error(_post(server, "/v1/completions", big), 413, None)
    not_found = httpx.get(f"{server.url}/v1/nothing-here")
    assert not_found.status_code == 404 and "error" in not_found.json()


def test_openai_client_sees_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert info.value.param == "temperature"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)


def test_api_key(engine_client: LocalEngineClient) -> None:
    server = Server(build_openai_app(engine_client, api_key=API_KEY))
    try:
        url = f"{server.url}/v1"
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert info.value.status_code == 401
        for headers in ({}, {"authorization": f"Basic {API_KEY}"}):  # missing, or not Bearer
            response = httpx.post(f"{url}/completions", json={"prompt": "x"}, headers=headers)
            assert _error(response, 401, None)["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).choices
        assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
    finally:
        server.stop()


def test_overload_is_429(tiny_checkpoint: Any) -> None:
    busy = make_engine_client(str(tiny_checkpoint), max_pending_requests=1)
    server = Server(build_openai_app(busy))

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(
                http.post(f"{server.url}/v1/completions",
                          json={"prompt": p, "max_tokens": 16, "temperature": 0})
                for p in PROMPTS))

    try:
        statuses = [r.status_code for r in asyncio.run(fire())]
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
        rejected = next(r for r in asyncio.run(fire()) if r.status_code == 429)
        assert rejected.json()["error"]["type"] == "rate_limit_error"
        wait_idle(busy)
    finally:
        server.stop()
        busy.engine.shutdown()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_disconnect_mid_stream_frees_blocks(server: Server, engine_client: LocalEngineClient,
                                            path: str) -> None:
    wait_idle(engine_client)
    steps_before = engine_client.engine.steps
    body: dict[str, Any] = {"max_tokens": 200, "temperature": 0, "stream": True,
                            "ignore_eos": True}
    body.update({"prompt": "hello"} if "chat" not in path else {"messages": CHAT})
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        events: list[str] = []
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 2:
                break
        assert engine_client.engine.num_pending == 1
    wait_idle(engine_client)
    # The request was aborted, not run to its 200 tokens.
    assert engine_client.engine.steps - steps_before < 150
    assert engine_client.engine.num_pending == 0


def test_disconnect_while_waiting_for_whole_answer(server: Server,
                                                   engine_client: LocalEngineClient) -> None:
    wait_idle(engine_client)
    steps_before = engine_client.engine.steps
    body = {"prompt": "hello", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body,
                   timeout=httpx.Timeout(30, read=0.3))
    wait_idle(engine_client)
    assert engine_client.engine.steps - steps_before < 200
