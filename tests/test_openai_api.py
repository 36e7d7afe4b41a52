"""The OpenAI-compatible REST front end, end to end: a real uvicorn server in this process over
LocalEngineClient on the tiny checkpoint, driven by the real `openai` client and raw HTTP. Outputs
must equal the offline `LLM` token for token; every bad input gets its status and an OpenAI
error body naming the field; a client that disconnects frees its KV blocks."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from zayaserve import LLM, SamplingParams
from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.openai_api import build_openai_app
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine

try:
    import httpx
except ImportError:  # some images ship the client as httpx2 (same API)
    import httpx2 as httpx  # type: ignore[no-redef]

MODEL = "zaya-tiny"
API_KEY = "sekret"
ENGINE_KW: dict[str, Any] = dict(num_kv_blocks=128, max_model_len=256)
PROMPTS = ["hello world", "the quick brown fox", "abc", "Zyphra", "one two three"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_engine_client(path: str, **async_kw: Any) -> LocalEngineClient:
    engine = LLMEngine(EngineConfig(model=path, **ENGINE_KW))
    return LocalEngineClient(AsyncLLMEngine(engine, **async_kw), MODEL)


class Server:
    """uvicorn on a free port, on its own thread and event loop."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_idle(engine_client: LocalEngineClient, timeout: float = 20.0) -> None:
    """Until nothing runs and every KV block is back in the pool."""
    sched = engine_client.engine.engine.scheduler
    deadline = time.monotonic() + timeout
    while True:
        idle = (not engine_client.engine.engine.has_unfinished_requests() and not sched.running
                and sched.blocks.num_free == sched.blocks.num_blocks)
        if idle:
            return
        assert time.monotonic() < deadline, "requests still running / KV blocks not freed"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Any) -> LLM:
    return LLM(str(tiny_checkpoint), **ENGINE_KW)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


# ---- outputs equal the offline API ------------------------------------------------------


def test_completions_concurrent_equal_llm(server: Server, llm: LLM) -> None:
    expected = llm.generate(PROMPTS, greedy(max_tokens=6))

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        try:
            return await asyncio.gather(*(
                client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
                for p in PROMPTS))
        finally:
            await client.close()

    for resp, ref in zip(asyncio.run(run()), expected, strict=True):
        out = ref.outputs[0]
        assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
        assert resp.model == MODEL and resp.created > 0
        assert resp.choices[0].text == out.text
        assert resp.choices[0].finish_reason == out.finish_reason == "length"
        assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert resp.usage.completion_tokens == len(out.token_ids) == 6
        assert resp.usage.total_tokens == len(ref.prompt_token_ids) + 6


def test_completions_stream_concurrent_equal_llm(server: Server, llm: LLM) -> None:
    expected = llm.generate(PROMPTS[:3], greedy(max_tokens=6))

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, Any, Any]:
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, finish, usage

    async def run() -> list[tuple[str, Any, Any]]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        try:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS[:3]))
        finally:
            await client.close()

    for (text, finish, usage), ref in zip(asyncio.run(run()), expected, strict=True):
        assert text == ref.outputs[0].text and finish == "length"
        assert usage.completion_tokens == 6 and usage.prompt_tokens == len(ref.prompt_token_ids)


def test_token_id_prompts_batch_and_n(client: openai.OpenAI, llm: LLM) -> None:
    prompts = [[2, 75, 430], [2, 17, 42, 99]]
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=5)
    expected = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    resp = client.completions.create(model=MODEL, prompt=prompts, n=2, seed=7, max_tokens=5,
                                     temperature=1.0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    want = [c.text for ref in expected for c in ref.outputs]
    assert [c.text for c in resp.choices] == want
    assert want[0] != want[1] or want[2] != want[3]  # n samples really are different draws
    assert resp.usage.prompt_tokens == 3 + 4 and resp.usage.completion_tokens == 4 * 5


def test_text_batch_stream_with_n_matches_whole(client: openai.OpenAI, llm: LLM) -> None:
    prompts = ["abc", "hello world"]
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=4)
    want = [c.text for ref in llm.generate(prompts, params) for c in ref.outputs]
    kw: dict[str, Any] = dict(model=MODEL, prompt=prompts, n=2, seed=5, max_tokens=4,
                              temperature=1.0)
    assert [c.text for c in client.completions.create(**kw).choices] == want
    texts = [""] * 4
    finishes: list[str | None] = [None] * 4
    for chunk in client.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == want and finishes == ["length"] * 4


def test_sse_framing(server: Server) -> None:
    body = {"prompt": "abc", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[0][len("data: "):])["object"] == "text_completion"


def test_chat_equal_llm_chat(client: openai.OpenAI, llm: LLM) -> None:
    ref = llm.chat(CHAT, greedy(max_tokens=6))[0]
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                          temperature=0)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == 6
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
             for m in CHAT]
    as_parts = client.chat.completions.create(model=MODEL, messages=parts,  # type: ignore
                                              max_tokens=6, temperature=0)
    assert as_parts.choices[0].message.content == ref.outputs[0].text
    # max_completion_tokens is the newer name of the same limit
    again = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0,
                                           max_completion_tokens=3)
    assert again.usage.completion_tokens == 3


def test_chat_stream_equal_llm_chat(client: openai.OpenAI, llm: LLM) -> None:
    ref = llm.chat(CHAT, greedy(max_tokens=6))[0].outputs[0]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == ref.text
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


# ---- sampling fields are honoured -------------------------------------------------------


def test_stop_strings_streamed_and_whole(client: openai.OpenAI, llm: LLM) -> None:
    full = llm.generate("hello world", greedy(max_tokens=12))[0].outputs[0].text
    stop = full[5:7]
    ref = llm.generate("hello world", greedy(max_tokens=12, stop=[stop]))[0].outputs[0]
    assert ref.finish_reason == "stop" and stop not in ref.text
    whole = client.completions.create(model=MODEL, prompt="hello world", max_tokens=12,
                                      temperature=0, stop=stop)
    assert whole.choices[0].text == ref.text and whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].model_extra["stop_reason"] == stop
    streamed = client.completions.create(model=MODEL, prompt="hello world", max_tokens=12,
                                         temperature=0, stop=[stop], stream=True)
    # the stop string never leaks out in a delta that is later cut off
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text


def test_vllm_extras_top_k_stop_token_ids(client: openai.OpenAI, llm: LLM) -> None:
    greedy_ids = llm.generate("abc", greedy(max_tokens=8))[0].outputs[0]
    sampled = llm.generate("abc", SamplingParams(temperature=1.0, seed=1, max_tokens=8))
    assert sampled[0].outputs[0].text != greedy_ids.text  # so top_k has something to change
    # top_k=1 at temperature 1 is greedy
    k1 = client.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=1.0,
                                   seed=1, extra_body={"top_k": 1})
    assert k1.choices[0].text == greedy_ids.text
    stop_id = greedy_ids.token_ids[2]
    resp = client.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0,
                                     extra_body={"stop_token_ids": [stop_id]})
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].model_extra["stop_reason"] == stop_id
    assert resp.usage.completion_tokens == greedy_ids.token_ids.index(stop_id) + 1
    # min_tokens suppresses the stop token until that many tokens exist
    held = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=8, temperature=0,
        extra_body={"stop_token_ids": [greedy_ids.token_ids[0]], "min_tokens": 4})
    ref = llm.generate("abc", greedy(max_tokens=8, stop_token_ids=[greedy_ids.token_ids[0]],
                                     min_tokens=4))[0].outputs[0]
    assert held.usage.completion_tokens == len(ref.token_ids) >= 4
    assert held.choices[0].text == ref.text


def test_ignore_eos(client: openai.OpenAI, llm: LLM) -> None:
    # Find a prompt whose seeded sample ends on EOS (the tiny model's weights are fixed).
    params = SamplingParams(temperature=1.5, seed=1, max_tokens=24)
    candidates = [[2, i, i + 1] for i in range(10, 500, 7)]
    outs = llm.generate([{"prompt_token_ids": c} for c in candidates], params)
    hits = [(c, o.outputs[0]) for c, o in zip(candidates, outs, strict=True)
            if o.outputs[0].finish_reason == "stop"]
    assert hits, "no seeded sample ended on EOS; pick other candidates"
    prompt, ref = hits[0]
    kw: dict[str, Any] = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=1.5,
                              seed=1)
    stopped = client.completions.create(**kw)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == len(ref.token_ids) < 24
    kept = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 24


def test_completion_logprobs_legacy_format(client: openai.OpenAI, llm: LLM) -> None:
    ref = llm.generate("hello world", greedy(max_tokens=4, logprobs=2))[0].outputs[0]
    resp = client.completions.create(model=MODEL, prompt="hello world", max_tokens=4,
                                     temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for got, token_id, entries in zip(lp.token_logprobs, ref.token_ids, ref.logprobs,
                                      strict=True):
        assert got == pytest.approx(entries[token_id].logprob, abs=1e-5)
    # The sampled token plus the top 2, keyed by text: tokens that decode alike (partial UTF-8
    # bytes all read U+FFFD) share a key, so there may be fewer keys.
    assert all(1 <= len(top) <= 3 and tok in top
               for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True))
    assert max(len(top) for top in lp.top_logprobs) >= 2
    assert lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    streamed = client.completions.create(model=MODEL, prompt="hello world", max_tokens=4,
                                         temperature=0, logprobs=2, stream=True)
    tokens = [t for c in streamed for ch in c.choices for t in ch.logprobs.tokens]
    assert tokens == lp.tokens


def test_chat_logprobs_format(client: openai.OpenAI, llm: LLM) -> None:
    ref = llm.chat(CHAT, greedy(max_tokens=4, logprobs=3))[0].outputs[0]
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for item, token_id, entries in zip(content, ref.token_ids, ref.logprobs, strict=True):
        assert item.logprob == pytest.approx(entries[token_id].logprob, abs=1e-5)
        assert isinstance(item.token, str) and all(0 <= b < 256 for b in item.bytes)
        assert len(item.top_logprobs) == 3
        assert [t.logprob for t in item.top_logprobs] == sorted(
            (t.logprob for t in item.top_logprobs), reverse=True)
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                           temperature=0)
    assert plain.choices[0].logprobs is None


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
