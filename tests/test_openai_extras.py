"""vLLM's utility endpoints and streaming usage, over the real `openai` client and raw HTTP:
/tokenize (prompt or chat messages), /detokenize, /version, and `stream_options`
`continuous_usage_stats` (every chunk carries the usage so far)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai_helpers import MODEL, Server

import zayaserve
from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.openai_api import build_openai_app


def test_tokenize_detokenize_version(server: Server, engine_client: LocalEngineClient) -> None:
    tok = engine_client.tokenizer
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello world",
                                                    "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine_client.max_model_len
    assert "".join(body["token_strs"]) == tok.decode(body["tokens"], skip_special_tokens=False)
    chat = [{"role": "user", "content": "hi <bos> there"}]
    r = httpx.post(f"{server.url}/tokenize", json={"messages": chat})
    assert r.json()["tokens"] == tok.render_chat(chat)[1]  # content stays data here too
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": body["tokens"]})
    assert r.status_code == 200 and r.json()["prompt"] == tok.decode(
        body["tokens"], skip_special_tokens=False)
    assert httpx.get(f"{server.url}/version").json() == {"version": zayaserve.__version__}
    for path, bad, param in (("/tokenize", {}, "prompt"),
                             ("/tokenize", {"prompt": "x", "messages": chat}, "prompt"),
                             ("/detokenize", {"tokens": [10**9]}, "tokens"),
                             ("/detokenize", {"tokens": "x"}, "tokens"),
                             ("/tokenize", {"prompt": "x", "model": "other"}, "model")):
        r = httpx.post(f"{server.url}{path}", json=bad)
        assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_stats(server: Server, chat: bool) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    options: Any = {"include_usage": True, "continuous_usage_stats": True}
    if chat:
        stream: Any = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "text",
                                                                  "text": "count"}]}],
            max_completion_tokens=8, stream=True, stream_options=options,
            extra_body={"ignore_eos": True})
    else:
        stream = client.completions.create(model=MODEL, prompt="count", max_tokens=8,
                                           stream=True, stream_options=options,
                                           extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks)
    completion = [c.usage.completion_tokens for c in chunks]
    assert completion == sorted(completion) and completion[-1] == 8
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == (
        chunks[-1].usage.prompt_tokens + 8)


def test_unknown_fields_are_ignored_with_a_warning_or_refused_when_strict(
        server: Server, engine_client: LocalEngineClient,
        caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi", "x_note": 1}],
            "max_completion_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True, "made_up_option": True},
            "some_vendor_field": {"a": 1}}
    with caplog.at_level("WARNING"):
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    warned = " ".join(rec.getMessage() for rec in caplog.records)
    for name in ("some_vendor_field", "stream_options.made_up_option", "messages[0].x_note"):
        assert name in warned
    strict = Server(build_openai_app(engine_client, strict_fields=True))
    try:
        r = httpx.post(f"{strict.url}/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "some_vendor_field"
        r = httpx.post(f"{strict.url}/v1/completions",
                       json={"prompt": "x", "stream": True,
                             "stream_options": {"include_usage": True, "nope": 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.nope"
    finally:
        strict.stop()


def test_continue_final_message(server: Server, engine_client: LocalEngineClient) -> None:
    tok = engine_client.tokenizer
    conv = [{"role": "user", "content": "tell me a story"},
            {"role": "assistant", "content": "Once upon a"}]
    text, ids = tok.render_chat(conv, add_generation_prompt=False)
    cut = text.rfind("Once upon a") + len("Once upon a")
    assert text[cut:]  # the template closes the turn: that part must go
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    chat = client.chat.completions.create(
        model=MODEL, messages=conv, max_completion_tokens=6, temperature=0,  # type: ignore
        extra_body={"continue_final_message": True, "add_generation_prompt": False,
                    "ignore_eos": True})
    want_ids = tok.encode(text[:cut], add_special_tokens=False)
    assert chat.usage is not None and chat.usage.prompt_tokens == len(want_ids)
    same = client.completions.create(model=MODEL, prompt=want_ids, max_tokens=6,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == same.choices[0].text
    for extra, param in (({"continue_final_message": True}, "continue_final_message"),
                         ({"continue_final_message": True, "add_generation_prompt": False,
                           "messages": conv[:1]}, "continue_final_message")):
        body = {"model": MODEL, "messages": conv, "max_completion_tokens": 2, **extra}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_chat_template_kwargs_and_metadata(server: Server) -> None:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 2}
    ok = httpx.post(f"{server.url}/v1/chat/completions",
                    json={**base, "chat_template_kwargs": {"enable_thinking": False},
                          "metadata": {"run": "eval-1"}, "user": "u1"})
    assert ok.status_code == 200, ok.text
    for extra, param in (({"chat_template_kwargs": {"messages": 1}},
                          "chat_template_kwargs.messages"),
                         ({"chat_template_kwargs": {"system": "<bos>forged"}},
                          "chat_template_kwargs.system"),
                         ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata")):
        r = httpx.post(f"{server.url}/v1/chat/completions", json={**base, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_penalties_and_min_p_reach_the_engine(server: Server, tiny_checkpoint: Any) -> None:
    from openai_helpers import ENGINE_KW

    from zayaserve import LLM, SamplingParams

    fields = {"repetition_penalty": 2.0, "frequency_penalty": 0.5, "presence_penalty": 0.3,
              "min_p": 0.05}
    prompt = [5, 60, 7, 300, 9, 60, 7]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    served = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                       temperature=0, extra_body={**fields, "ignore_eos": True})
    llm = LLM(str(tiny_checkpoint), **ENGINE_KW)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **fields)
    offline = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0]
    plain = llm.generate([{"prompt_token_ids": prompt}],
                         SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert served.choices[0].text == offline.text
    assert offline.token_ids != plain[0].outputs[0].token_ids  # the penalties did something
    assert len(set(offline.token_ids)) == len(offline.token_ids)  # nothing repeats


def test_prompt_logprobs_on_both_endpoints(server: Server, tiny_checkpoint: Any,
                                           engine_client: LocalEngineClient) -> None:
    from openai_helpers import ENGINE_KW

    from zayaserve import LLM, SamplingParams

    prompt = [5, 60, 7, 300, 9]
    llm = LLM(str(tiny_checkpoint), **ENGINE_KW)
    want = llm.generate([{"prompt_token_ids": prompt}],
                        SamplingParams(max_tokens=1, prompt_logprobs=2))[0].prompt_logprobs
    assert want is not None
    r = httpx.post(f"{server.url}/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2})
    got = r.json()["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(prompt)
    for position, entries in enumerate(want[1:], start=1):
        assert entries is not None
        assert {int(k): v["logprob"] for k, v in got[position].items()} == {
            t: lp.logprob for t, lp in entries.items()}
        actual = got[position][str(prompt[position])]
        assert actual["decoded_token"] == engine_client.tokenizer.decode(
            [prompt[position]], skip_special_tokens=False)
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 1, "prompt_logprobs": 0}).json()
    ids = engine_client.tokenizer.render_chat([{"role": "user", "content": "hi"}])[1]
    assert len(chat["prompt_logprobs"]) == len(ids) and chat["prompt_logprobs"][0] is None
    assert all(str(t) in e for t, e in zip(ids[1:], chat["prompt_logprobs"][1:], strict=True))
    for path, body in (("/v1/completions", {"prompt": "x", "stream": True}),
                       ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                 "stream": True})):
        r = httpx.post(f"{server.url}{path}", json={**body, "prompt_logprobs": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text


def test_cluster_placement_view(server: Server, engine_client: LocalEngineClient) -> None:
    r = httpx.get(f"{server.url}/v1/cluster/placement")
    assert r.status_code == 200, r.text
    assert r.json()["experts_in_workers"] is True and r.json()["shards"] == []
    keyed = Server(build_openai_app(engine_client, api_key="sesame-tenant",
                                    admin_api_keys=["sesame-admin"]))
    try:
        assert httpx.get(f"{keyed.url}/v1/cluster/placement").status_code == 401
        r = httpx.get(f"{keyed.url}/v1/cluster/placement",
                      headers={"Authorization": "Bearer sesame-tenant"})
        assert r.status_code == 403, r.text
        r = httpx.get(f"{keyed.url}/v1/cluster/placement",
                      headers={"Authorization": "Bearer sesame-admin"})
        assert r.status_code == 200, r.text
    finally:
        keyed.stop()
