"""The OpenAI-compatible REST front end, end to end: a real uvicorn server in this process over
LocalEngineClient on the tiny checkpoint, driven by the real `openai` client and raw HTTP.
Outputs must equal the offline `LLM` token for token, and every sampling field is honoured
(errors, keys and disconnects: test_openai_errors.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from openai_helpers import (
    CHAT,
    ENGINE_KW,
    MODEL,
    PROMPTS,
    Server,
    greedy,
    httpx,
)

from zayaserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Any) -> LLM:
    return LLM(str(tiny_checkpoint), **ENGINE_KW)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


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
