"""Markovian RSA through the surfaces users call: REST (`rsa` and the flat rsa_* fields, with
the real `openai` client too), gRPC and the offline `LLM.rsa`, on the tiny model in one
process. The cluster path (a worker runs the whole run) is in test_cluster_e2e.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from openai_helpers import Server
from test_grpc_api import GrpcServer, wait_idle

from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.openai_api import build_openai_app
from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.rsa.serving import RSALimits

MODEL = "zaya-tiny"
BLOCK = 4
PROBLEM = "A farmer has 17 sheep and all but 9 run away. How many are left? Explain."
RSA = {"n": 4, "k": 2, "t": 2, "tail_tokens": 12, "round_max_tokens": 16,
       "final_max_tokens": 16, "seed": 11}
FLAT = {f"rsa_{k}": v for k, v in RSA.items()}
LIMITS = RSALimits(max_tokens=200_000, max_calls_per_round=8)
ENGINE_KW: dict[str, Any] = dict(num_kv_blocks=1024, block_size=BLOCK, max_model_len=1024,
                                 enable_prefix_caching=True)


@pytest.fixture(scope="module")
def engine_client(tiny_checkpoint: Any) -> Iterator[LocalEngineClient]:
    client = LocalEngineClient(AsyncLLMEngine(LLMEngine(EngineConfig(
        model=str(tiny_checkpoint), **ENGINE_KW))), MODEL)
    yield client
    client.engine.shutdown()


@pytest.fixture(scope="module")
def server(engine_client: LocalEngineClient) -> Iterator[Server]:
    s = Server(build_openai_app(engine_client, rsa_limits=LIMITS))
    yield s
    s.stop()


def _chat(server: Server, salt: str, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROBLEM}],
            "cache_salt": salt, **fields}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def _stable(response: dict[str, Any]) -> str:
    """The response without what differs per response whatever the seed (id, time)."""
    return json.dumps({k: v for k, v in response.items() if k not in ("id", "created")},
                      sort_keys=True)


def test_rounds_usage_and_cache(server: Server, engine_client: LocalEngineClient) -> None:
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


def test_seed_reproducible_and_other_seed_differs(server: Server) -> None:
    # Each run in its own cache namespace, so even the cached-token figures repeat.
    first, again = (_chat(server, salt, rsa=RSA).json() for salt in ("seed-a", "seed-b"))
    assert _stable(first) == _stable(again)
    other = _chat(server, "seed-c", rsa={**RSA, "seed": 12}).json()
    assert other["choices"][0]["message"] != first["choices"][0]["message"]
    # A request's own seed seeds the run when rsa.seed is not set.
    seeded = _chat(server, "seed-d", seed=11, rsa={k: v for k, v in RSA.items() if k != "seed"})
    assert _stable(seeded.json()) == _stable(first)


def _generated(server: Server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "zayaserve_generation_tokens_total"
               and sample.labels.get("endpoint") == "/v1/chat/completions")


def test_metrics_count_every_call(server: Server) -> None:
    before = _generated(server)
    body = _chat(server, "metrics", rsa=RSA).json()
    assert _generated(server) - before == body["usage"]["completion_tokens"]


def test_t0_is_a_plain_generation_and_k_is_clamped(server: Server) -> None:
    plain = _chat(server, "t0", rsa={**RSA, "t": 0, "final_n": 3}).json()
    assert [x["calls"] for x in plain["rsa"]["rounds"]] == [3]
    assert len(plain["choices"]) == 3
    clamped = _chat(server, "k9", rsa={**RSA, "n": 2, "k": 9}).json()
    assert clamped["rsa"]["k"] == 2 and [x["calls"] for x in clamped["rsa"]["rounds"]] == [2, 2, 1]


def test_flat_aliases(server: Server) -> None:
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
def test_bad_requests_are_400_naming_the_field(server: Server, engine_client: LocalEngineClient,
                                               fields: dict[str, Any], param: str) -> None:
    r = _chat(server, "bad", **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith(param)
    assert "Traceback" not in r.text
    wait_idle(engine_client)


def test_streaming_progress_then_answer(server: Server) -> None:
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


def test_openai_client(server: Server) -> None:
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


def test_client_disconnect_aborts_every_call(server: Server,
                                             engine_client: LocalEngineClient) -> None:
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


@pytest.fixture(scope="module")
def stub(engine_client: LocalEngineClient) -> Iterator[Any]:
    server = GrpcServer(engine_client, rsa_limits=LIMITS)
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationStub(channel)
    server.stop()


def _grpc_request(salt: str, **rsa: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=PROBLEM)]),
        cache_salt=salt, rsa=pb.RSAParams(**{**RSA, **rsa}))


def test_grpc_matches_rest(stub: Any, server: Server) -> None:
    rest = _chat(server, "grpc-rest", rsa=RSA).json()
    unary = stub.GenerateUnary(_grpc_request("grpc-unary"), timeout=120)
    assert unary.outputs[0].text == rest["choices"][0]["message"]["content"]
    assert [r.calls for r in unary.rsa.rounds] == [4, 4, 1]
    assert unary.usage.prompt_tokens == rest["usage"]["prompt_tokens"]
    assert unary.usage.cached_tokens == rest["usage"]["prompt_tokens_details"]["cached_tokens"]
    messages = list(stub.Generate(_grpc_request("grpc-stream"), timeout=120))
    progress = [m.rsa_progress.calls_done for m in messages if m.HasField("rsa_progress")]
    assert progress[-1] == 9
    assert "".join(o.text for m in messages for o in m.outputs) == unary.outputs[0].text
    assert messages[-1].finished and messages[-1].rsa.calls == 9


def test_python_grpc_client(engine_client: LocalEngineClient) -> None:
    from zayaserve.client import ZayaClient

    server = GrpcServer(engine_client, rsa_limits=LIMITS)
    try:
        with ZayaClient(server.target) as client:
            result = client.generate(messages=[{"role": "user", "content": PROBLEM}],
                                     rsa={**RSA, "final_sampling": {"top_k": 5}})
    finally:
        server.stop()
    assert result.rsa is not None and [r["calls"] for r in result.rsa["rounds"]] == [4, 4, 1]
    assert result.usage.prompt_tokens == sum(r["prompt_tokens"] for r in result.rsa["rounds"])
    assert result.rsa["seed"] == RSA["seed"] and result.rsa["population"] is None


@pytest.mark.parametrize(("request_fields", "param"), [
    (dict(rsa=pb.RSAParams(n=0)), "rsa.n"),
    (dict(rsa=pb.RSAParams(**{**RSA, "tail_tokens": 4000})), "rsa.tail_tokens"),
    (dict(rsa=pb.RSAParams(final_sampling=pb.RSAFinalSampling(top_p=2.0))),
     "rsa.final_sampling.top_p"),
    (dict(rsa=pb.RSAParams(n=2), sampling=pb.SamplingParams(temperature=0.5)), "sampling"),
])
def test_grpc_bad_fields(stub: Any, request_fields: dict[str, Any], param: str) -> None:
    request = pb.GenerateRequest(prompt=PROBLEM, **request_fields)
    with pytest.raises(grpc.RpcError) as caught:
        stub.GenerateUnary(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(param)


def test_offline_llm_rsa(tiny_checkpoint: Any) -> None:
    from zayaserve import LLM, RSAParams

    llm = LLM(model=str(tiny_checkpoint), **ENGINE_KW)
    messages = [{"role": "user", "content": PROBLEM}]
    result = llm.rsa(messages, RSAParams(**{**RSA, "final_n": 2}))
    assert [r.calls for r in result.rounds] == [4, 4, 2]
    assert len(result.answers) == 2
    again = llm.rsa(messages, **{**RSA, "final_n": 2})
    assert [a.outputs[0].text for a in again.answers] == [
        a.outputs[0].text for a in result.answers]
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="rsa.tail_tokens"):
        llm.rsa(messages, **{**RSA, "tail_tokens": 4000})


@pytest.fixture(scope="module")
def small_queue(tiny_checkpoint: Any) -> Iterator[tuple[Server, LocalEngineClient]]:
    client = LocalEngineClient(AsyncLLMEngine(LLMEngine(EngineConfig(
        model=str(tiny_checkpoint), **ENGINE_KW)), max_pending_requests=6), MODEL)
    server = Server(build_openai_app(client, rsa_limits=LIMITS))
    yield server, client
    server.stop()
    client.engine.shutdown()


def test_a_run_that_does_not_fit_the_queue_is_refused_whole(
        small_queue: tuple[Server, LocalEngineClient]) -> None:
    """A round's worth of the queue is reserved before the first call: with 3 of 6 slots
    taken, a run of 4 calls per round is a 429 before any of its calls reaches the engine."""
    server, client = small_queue
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
