"""Faults in a real local Ray Serve cluster: strangers calling the expert shards' port are
refused and a flood of their calls changes no request's tokens, expert shards held down past the
token router's wait fail the in-flight requests with 503 while the attention worker lives on,
and an engine whose loop dies makes its replica unhealthy, so Serve replaces it; /health says so
throughout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
import torch
from cluster_harness import MAX_TOKENS, PROMPTS, Cluster, deploy, undeploy

from zayaserve.replicas.model.checkpoint_paths import resolve_model
from zayaserve.replicas.model.config import ZayaConfig
from zayaserve.router.protos import expert_pb2, expert_pb2_grpc
from zayaserve.router.shard_channels import call_metadata
from zayaserve.router.shard_server import dispatch_message_limit
from zayaserve.router.tensor_codec import encode

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(ray_session: None) -> Iterator[Cluster]:
    c = deploy(expert_shards=2, expert_replication=1, dispatch_deadline_s=1.0,
               wait_for_replica_s=2.0)
    yield c
    undeploy()


def _want(offline: dict[str, Any]) -> str:
    from zayaserve.replicas.model.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(resolve_model("tiny")).decode(offline[PROMPTS[0]])


def _probe(cluster: Cluster, timeout: float = 60) -> httpx.Response:
    return httpx.post(cluster.base + "/v1/completions", timeout=timeout, json={
        "model": "tiny", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0,
        "ignore_eos": True})


def _worker_replica() -> str:
    from ray import serve

    handle = serve.get_deployment_handle("AttentionWorker", app_name="zayaserve")
    return str(handle.describe.remote().result(timeout_s=60)["replica"])


def _until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _dispatch(rows: int, hidden: int, expert: int) -> expert_pb2.DispatchRequest:
    return expert_pb2.DispatchRequest(layer=0, hidden=encode(torch.randn(rows, hidden)),
                                      expert_ids=[expert] * rows, weights=encode(torch.ones(rows)))


def _flood_while(addresses: list[str], forged: list[Any], hidden: int, holds: list[int],
                 legit: Any) -> tuple[Any, dict[str, int], int]:
    """Waves of 200 concurrent foreign calls (Dispatch of experts the shard holds, and Info)
    to every shard, from before `legit()` starts until it ends; its result, the codes, waves."""
    async def run() -> tuple[Any, dict[str, int], int]:
        channels = [grpc.aio.insecure_channel(a) for a in addresses for _ in range(2)]
        stubs = [expert_pb2_grpc.ExpertShardStub(c) for c in channels]
        codes: dict[str, int] = {}
        done = asyncio.Event()

        async def stranger(i: int) -> None:
            k = i % len(stubs)
            stub, meta = stubs[k], forged[i % len(forged)]
            call = (stub.Info(expert_pb2.InfoRequest(), timeout=10, metadata=meta) if i % 5 == 0
                    else stub.Dispatch(_dispatch(8, hidden, holds[k // 2]), timeout=10,
                                       metadata=meta))
            try:
                await call
                name = "OK"
            except grpc.aio.AioRpcError as e:
                name = e.code().name
            codes[name] = codes.get(name, 0) + 1

        async def flood() -> int:
            waves = 0
            while not done.is_set():
                await asyncio.gather(*(stranger(i) for i in range(200)))
                waves += 1
            return waves

        flooding = asyncio.ensure_future(flood())
        await asyncio.sleep(0.3)  # the flood is on before the first legitimate call
        result = await legit()
        done.set()
        waves = await flooding
        for channel in channels:
            await channel.close()
        return result, codes, waves

    return asyncio.run(run())


def test_strangers_are_refused_and_their_flood_changes_no_token(
        cluster: Cluster, offline: dict) -> None:
    """The shards listen on the node's address only and refuse calls without the deployment's
    token (UNAUTHENTICATED) or over the size cap (RESOURCE_EXHAUSTED); hundreds of foreign calls
    at once while REST requests run leave every request exact, within a 1 s dispatch deadline."""
    import ray

    from zayaserve.replicas.model.tokenizer import Tokenizer

    addresses = list(cluster.placement().addresses.values())
    node_ip, token = ray.util.get_node_ip_address(), cluster.shard_token()
    assert {a.rsplit(":", 1)[0].strip("[]") for a in addresses} == {node_ip}
    hidden = ZayaConfig.from_pretrained(resolve_model("tiny")).hidden_size
    holds = [int(info.experts[0]) for info in cluster.shard_infos()]  # by placement order
    cap = dispatch_message_limit(cluster.cfg.engine.max_num_batched_tokens, hidden)
    with grpc.insecure_channel(addresses[0]) as channel:
        stub = expert_pb2_grpc.ExpertShardStub(channel)
        for call, code in [
                (lambda: stub.Dispatch(_dispatch(4, hidden, holds[0]), timeout=10),
                 grpc.StatusCode.UNAUTHENTICATED),
                (lambda: stub.Info(expert_pb2.InfoRequest(), timeout=10),
                 grpc.StatusCode.UNAUTHENTICATED),
                (lambda: stub.Dispatch(_dispatch(cap // (4 * hidden) + 1, hidden, holds[0]),
                                       timeout=10, metadata=call_metadata(token)),
                 grpc.StatusCode.RESOURCE_EXHAUSTED)]:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code and token not in (err.value.details() or "")
        assert stub.Dispatch(_dispatch(4, hidden, holds[0]), timeout=10,
                             metadata=call_metadata(token)).out.data
    if node_ip != "127.0.0.1":  # bound to the node's address, not every interface
        port = addresses[0].rsplit(":", 1)[1]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, \
                pytest.raises(grpc.RpcError) as err:
            expert_pb2_grpc.ExpertShardStub(channel).Info(expert_pb2.InfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    async def legit() -> list[str]:
        client = openai.AsyncOpenAI(base_url=cluster.base + "/v1", api_key="x", max_retries=0)
        replies = await asyncio.gather(*(client.completions.create(
            model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True}) for p in PROMPTS))
        return [r.choices[0].text for r in replies]

    forged = [None, call_metadata("x" * len(token)), (("authorization", token),)]
    begin = time.monotonic()
    texts, codes, waves = _flood_while(addresses, forged, hidden, holds, legit)
    tokenizer = Tokenizer.from_pretrained(resolve_model("tiny"))
    assert texts == [tokenizer.decode(offline[p]) for p in PROMPTS]
    assert waves >= 1 and codes.get("UNAUTHENTICATED", 0) >= 200
    assert set(codes) <= {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}, codes  # none served
    assert time.monotonic() - begin < 60


def test_shards_held_down_fail_requests_with_503_and_the_worker_lives(
        cluster: Cluster, offline: dict) -> None:
    pids = [info.pid for info in cluster.shard_infos()]
    worker = _worker_replica()
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", cluster.base + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        try:
            for line in lines:
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 2:  # in flight: now take every shard away
                    for pid in pids:
                        os.kill(pid, signal.SIGSTOP)
                    held = _probe(cluster)  # a request arriving while they are away
            # The in-flight stream ends with an in-band 503-class error, not a hang.
            assert "error" in events[-1], events[-1]
            assert events[-1]["error"]["code"] == "service_unavailable"
            assert "Traceback" not in json.dumps(events[-1])
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
    assert held.status_code == 503, held.text
    assert held.headers.get("retry-after") == "1"
    assert held.json()["error"]["type"] == "server_error" and "Traceback" not in held.text
    # The worker never died: same replica, healthy, and exact again once shards answer.
    assert httpx.get(cluster.base + "/health", timeout=30).status_code == 200
    assert _worker_replica() == worker
    ok = _until(lambda: (r := _probe(cluster)).status_code == 200 and r, 60, "shards back")
    assert ok.json()["choices"][0]["text"] == _want(offline)


def test_a_dead_engine_loop_gets_its_replica_replaced(cluster: Cluster, offline: dict) -> None:
    import ray
    from ray.util import list_named_actors

    # Defined here so that Ray ships it by value (the worker cannot import test modules).
    def _kill_engine_loop(replica: Any) -> bool:
        """Runs inside the worker replica's actor: makes its engine loop die. (Reaches the
        AttentionWorker through Serve's private replica wrapper: test-only.)"""
        worker = replica._replica_impl._user_callable_wrapper._callable
        worker.engine._die(RuntimeError("engine loop killed by a test"))
        return bool(worker.engine.is_dead)

    before = _worker_replica()
    [actor] = [a for a in list_named_actors(all_namespaces=True)
               if "AttentionWorker" in a["name"] and before in a["name"]]
    handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
    assert ray.get(handle.__ray_call__.remote(_kill_engine_loop), timeout=60)
    # /health tells the truth at once: no live attention worker.
    dead = httpx.get(cluster.base + "/health", timeout=30)
    assert dead.status_code == 503 and "Traceback" not in dead.text
    # Serve's health check fails, the replica is replaced, and serving resumes, exactly.
    _until(lambda: httpx.get(cluster.base + "/health", timeout=30).status_code == 200, 240,
           "a healthy replacement worker")
    assert _worker_replica() != before
    r = _probe(cluster)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == _want(offline)


def _metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not on /metrics")


@pytest.fixture(scope="module")
def in_process(ray_session: None, cluster: Cluster) -> Iterator[Cluster]:
    del cluster
    undeploy()
    c = deploy(expert_shards=0, attention_workers=2)
    yield c
    undeploy()


def test_metrics_count_grpc_and_sum_every_worker(in_process: Cluster) -> None:
    """One registry for REST and gRPC; engine stats summed over both workers (not one)."""
    import grpc

    from zayaserve.cluster.protos import generation_pb2 as pb
    from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{in_process.cfg.grpc_port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        for _ in range(3):
            stub.GenerateUnary(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(
                max_tokens=2)), timeout=120)
    text = httpx.get(in_process.base + "/metrics", timeout=30).text
    assert _metric(text, "zayaserve_requests_total", endpoint="grpc.GenerateUnary",
                   status="OK") == 3

    def total_blocks() -> float:
        page = httpx.get(in_process.base + "/metrics", timeout=30).text
        try:
            return _metric(page, "zayaserve_kv_blocks_total")
        except AssertionError:  # no worker has reported yet (each reports once a second)
            return -1.0

    from ray import serve

    worker = serve.get_deployment_handle("AttentionWorker", app_name="zayaserve")
    one = worker.stats.remote().result(timeout_s=60)["kv_blocks_total"]
    # Workers report every second; the sum covers both once both have reported.
    _until(lambda: total_blocks() == 2 * one, 30, "the stats of both workers")
