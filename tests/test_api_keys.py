"""API keys as tenants: keys from a file or the environment (never a flag), 401s with OpenAI's
error body, per-key prefix-cache salts (one tenant's cached prefix is invisible to another, and
`cache_salt` narrows it further) over the real `openai` client and gRPC, and /metrics behind the
key when asked."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from openai_helpers import MODEL, Server, free_port, wait_idle

from zayaserve.cluster.frontend.api_keys import ApiKeys, cache_salt, load_api_keys
from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.frontend_errors import AuthenticationError
from zayaserve.cluster.frontend.grpc_server import start_grpc_server
from zayaserve.cluster.frontend.openai_api import build_openai_app
from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc

KEY_A, KEY_B = "tenant-a-key-0001", "tenant-b-key-0002"
PROMPT = " ".join(["shared system prompt"] * 12)  # several full blocks


def test_keys_from_config_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# one per line\n{KEY_A}\n\n{KEY_B}\n")
    monkeypatch.setenv("ZAYASERVE_API_KEY", "env-key-000001, env-key-000002")
    keys = load_api_keys("config-key-0001", str(f))
    assert keys == ["config-key-0001", KEY_A, KEY_B, "env-key-000001", "env-key-000002"]
    with pytest.raises(ValueError, match="api_key_file: cannot read"):
        load_api_keys(None, str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="api_key_file: .* holds no key"):
        load_api_keys(None, str(tmp_path / "empty"))
    monkeypatch.setenv("ZAYASERVE_API_KEY", "short")
    with pytest.raises(ValueError, match="at least 8"):
        load_api_keys()


def test_tenants_and_salts() -> None:
    keys = ApiKeys([KEY_A, KEY_B])
    a, b = keys.tenant(f"Bearer {KEY_A}"), keys.tenant(f"Bearer {KEY_B}".encode())
    assert a and b and a != b
    for bad in (None, "", KEY_A, f"Bearer {KEY_A}x", "Bearer "):
        with pytest.raises(AuthenticationError):
            keys.tenant(bad)
    assert ApiKeys([]).tenant(None) is None
    assert cache_salt(None, None) is None
    salts = {cache_salt(a, None), cache_salt(b, None), cache_salt(a, "x"), cache_salt(None, "x")}
    assert len(salts) == 4  # a tenant cannot choose a salt that lands in another's space
    assert cache_salt(a, "x") == cache_salt(a, "x")


@pytest.fixture(scope="module")
def server(engine_client: LocalEngineClient) -> Iterator[Server]:
    s = Server(build_openai_app(engine_client, api_keys=[KEY_A, KEY_B], metrics_need_key=True))
    yield s
    s.stop()


def _hits(engine_client: LocalEngineClient) -> float:
    wait_idle(engine_client)
    return engine_client.engine.engine.stats()["prefix_cache_local_hit_tokens"]


def test_rest_keys_salts_and_metrics(server: Server, engine_client: LocalEngineClient) -> None:
    def complete(key: str, **extra: Any) -> str:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                        temperature=0, extra_body=extra)
        return out.choices[0].text

    with pytest.raises(openai.AuthenticationError) as err:
        complete("wrong-key-00001")
    assert err.value.status_code == 401 and err.value.body["type"] == "invalid_request_error"
    answer = complete(KEY_A)
    start = _hits(engine_client)
    assert complete(KEY_B) == answer and _hits(engine_client) == start  # B cannot see A's
    assert complete(KEY_A, cache_salt="conv-1") == answer
    assert _hits(engine_client) == start  # nor A with another salt
    assert complete(KEY_A) == answer and _hits(engine_client) > start  # A sees its own
    bad = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "cache_salt": ""},
                     headers={"authorization": f"Bearer {KEY_A}"})
    assert bad.status_code == 400 and "cache_salt" in bad.json()["error"]["message"]
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    ok = httpx.get(f"{server.url}/metrics", headers={"authorization": f"Bearer {KEY_B}"})
    assert ok.status_code == 200 and "zayaserve_prefix_cache_hits_total" in ok.text


def test_grpc_keys_and_salts(engine_client: LocalEngineClient) -> None:
    async def run() -> list[Any]:
        port = free_port()
        server = await start_grpc_server(engine_client, port, "127.0.0.1",
                                         api_keys=[KEY_A, KEY_B])
        results: list[Any] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationStub(channel)
                req = pb.GenerateRequest(prompt="grpc only " * 20, sampling=pb.SamplingParams(
                    max_tokens=3, temperature=0))
                try:
                    await stub.GenerateUnary(req)
                except grpc.aio.AioRpcError as e:
                    results.append(e.code())
                for key, salt in ((KEY_A, None), (KEY_B, None), (KEY_A, "s"), (KEY_A, None)):
                    if salt is not None:
                        req.cache_salt = salt
                    else:
                        req.ClearField("cache_salt")
                    await stub.GenerateUnary(
                        req, metadata=(("authorization", f"Bearer {key}"),))
                    results.append(_hits(engine_client))
        finally:
            await server.stop(None)
        return results

    code, first, b, salted, again = asyncio.run(run())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert first == b == salted < again
