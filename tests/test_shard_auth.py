"""The expert shards' gRPC port is guarded: the deployment's RPC token on every ExpertShard call
(UNAUTHENTICATED without it, health stays open), a cap on concurrent calls and on message size
(RESOURCE_EXHAUSTED), and `build_app` handing one fresh token to shards and workers. Real gRPC
servers on free ports in this process; the cluster-level flood test is in test_cluster_e2e.py."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Coroutine
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from zayaserve.cluster.config import ClusterConfig, ClusterConfigError
from zayaserve.router.placement import PlacementMap
from zayaserve.router.protos import expert_pb2, expert_pb2_grpc
from zayaserve.router.shard_channels import call_metadata
from zayaserve.router.shard_server import (
    SERVICE_NAME,
    UNAUTHENTICATED_DETAILS,
    ExpertShardServicer,
    dispatch_message_limit,
    serve_shard,
)
from zayaserve.router.tensor_codec import encode
from zayaserve.router.token_router import ExpertShardError, TokenRouter

E, H = 4, 64
TOKEN = secrets.token_urlsafe(32)


def _compute(delay_s: float = 0.0) -> Any:
    def compute(layer: int, hidden: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        if delay_s:
            time.sleep(delay_s)
        return hidden * weights[:, None] + ids[:, None]

    return compute


async def _shard(delay_s: float = 0.0, **options: Any) -> tuple[ExpertShardServicer, Any]:
    servicer = ExpertShardServicer("s0", _compute(delay_s), range(E), 123, num_layers=2)
    server, _ = await serve_shard(servicer, port=0, **options)
    return servicer, server


def _request(rows: int, expert: int = 1) -> expert_pb2.DispatchRequest:
    hidden = torch.randn(rows, H)
    return expert_pb2.DispatchRequest(layer=1, hidden=encode(hidden), expert_ids=[expert] * rows,
                                      weights=encode(torch.rand(rows)))


def _placement(address: str) -> PlacementMap:
    return PlacementMap(1, E, {e: ("s0",) for e in range(E)}, {"s0": address})


def _run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=60))


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        assert TOKEN not in (err.details() or "")  # never echoed
        return err.code()
    return grpc.StatusCode.OK


def test_calls_without_the_right_token_are_unauthenticated() -> None:
    async def main() -> None:
        servicer, server = await _shard(token=TOKEN)
        async with grpc.aio.insecure_channel(servicer.address) as channel:
            stub = expert_pb2_grpc.ExpertShardStub(channel)
            request = _request(3)
            wrong = [call_metadata(secrets.token_urlsafe(32)), call_metadata(TOKEN[:-1]),
                     (("authorization", TOKEN),), (("authorization", f"bearer {TOKEN}"),),
                     (("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer x"))]
            for metadata in [None, *wrong]:
                assert await _code(stub.Dispatch(request, metadata=metadata)) == \
                    grpc.StatusCode.UNAUTHENTICATED, metadata
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Info(expert_pb2.InfoRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details() == UNAUTHENTICATED_DETAILS
            assert servicer.requests == 0 and servicer.rows_served == 0  # nothing computed
            # With the token: served as before.
            reply = await stub.Dispatch(request, metadata=call_metadata(TOKEN))
            assert reply.shard_id == "s0" and servicer.rows_served == 3
            info = await stub.Info(expert_pb2.InfoRequest(), metadata=call_metadata(TOKEN))
            assert info.shard_id == "s0" and list(info.experts) == list(range(E))
            # Probes need no token.
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # the token gets the health service itself
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health.Check(health_pb2.HealthCheckRequest(service="nope"),
                                   metadata=call_metadata(TOKEN))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        await server.stop(None)

    _run(main())


def test_stalled_strangers_hold_no_call_slot() -> None:
    """Headers sent, request never: a stranger's call is answered before its request is read
    (UNAUTHENTICATED, or SERVING for an open health Check), so it holds no slot of the cap;
    Watch, a stream without end, needs the token."""
    async def main() -> None:
        servicer, server = await _shard(token=TOKEN, max_concurrent_rpcs=2)
        never = asyncio.Event()

        async def stalled() -> Any:
            await never.wait()
            yield b""

        async with grpc.aio.insecure_channel(servicer.address) as channel:
            dispatch = channel.stream_unary(f"/{SERVICE_NAME}/Dispatch")
            check = channel.stream_unary(
                "/grpc.health.v1.Health/Check",
                response_deserializer=health_pb2.HealthCheckResponse.FromString)
            begin = time.monotonic()
            codes = await asyncio.gather(*(_code(dispatch(stalled(), timeout=10))
                                           for _ in range(4)))
            assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
            replies = await asyncio.gather(*(check(stalled(), timeout=10) for _ in range(4)))
            assert {r.status for r in replies} == {health_pb2.HealthCheckResponse.SERVING}
            assert time.monotonic() - begin < 1.0
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert await _code(watch.read()) == grpc.StatusCode.UNAUTHENTICATED
            # every slot is free again: a legitimate call goes through
            stub = expert_pb2_grpc.ExpertShardStub(channel)
            await stub.Dispatch(_request(2), metadata=call_metadata(TOKEN), timeout=10)
        never.set()
        await server.stop(None)

    _run(main())


def test_router_sends_the_token_and_fails_fast_without_it() -> None:
    async def main() -> None:
        servicer, server = await _shard(token=TOKEN)
        placement = _placement(servicer.address)
        hidden, ids, w = torch.randn(6, H), torch.tensor([0, 1, E, 2, 3, 0]), torch.rand(6)
        router = TokenRouter(lambda: placement, E, token=TOKEN)
        out = await router.dispatch(0, hidden, ids, w)
        sent = ids != E
        assert torch.equal(out[sent], _compute()(0, hidden[sent], ids[sent], w[sent]))
        await router.close()
        stranger = TokenRouter(lambda: placement, E, max_retries=5, wait_for_replica_s=5.0)
        begin = time.monotonic()
        with pytest.raises(ExpertShardError, match="UNAUTHENTICATED") as err:
            await stranger.dispatch(0, hidden, ids, w)
        assert time.monotonic() - begin < 1.0 and stranger.stats.retries == 0  # not retried
        assert TOKEN not in str(err.value)
        await stranger.close()
        await server.stop(None)

    _run(main())


def test_oversize_messages_are_refused_before_they_are_processed() -> None:
    async def main() -> None:
        cap = dispatch_message_limit(8, H)
        servicer, server = await _shard(token=TOKEN, max_message_bytes=cap)
        metadata = call_metadata(TOKEN)
        async with grpc.aio.insecure_channel(servicer.address) as channel:
            stub = expert_pb2_grpc.ExpertShardStub(channel)
            await stub.Dispatch(_request(8), metadata=metadata)  # a full step fits
            big = _request(cap // (H * 4) + 1)
            assert big.ByteSize() > cap
            assert await _code(stub.Dispatch(big, metadata=metadata)) == \
                grpc.StatusCode.RESOURCE_EXHAUSTED
            # a stranger's is refused before it is even read
            assert await _code(stub.Dispatch(big)) == grpc.StatusCode.UNAUTHENTICATED
            assert servicer.requests == 1
        # The router checks its own calls against the cap: a config error, not sent, not retried.
        router = TokenRouter(lambda: _placement(servicer.address), E, token=TOKEN,
                             max_message_bytes=4096)
        with pytest.raises(ExpertShardError, match="shard_max_message_bytes=4096"):
            await router.dispatch(0, torch.randn(64, H), torch.zeros(64, dtype=torch.int64),
                                  torch.rand(64))
        assert router.stats.calls == 0 and servicer.requests == 1
        await router.close()
        await server.stop(None)

    _run(main())


def test_message_limit_covers_a_full_step_of_any_expert_id() -> None:
    for rows, hidden in [(1, 1), (7, 64), (2048, 2048)]:
        request = expert_pb2.DispatchRequest(
            layer=2**31, hidden=encode(torch.zeros(rows, hidden)),
            expert_ids=[2**62] * rows, weights=encode(torch.zeros(rows)),
            placement_version=2**63)
        limit = dispatch_message_limit(rows, hidden)
        assert request.ByteSize() < limit < 1.3 * request.ByteSize() + 2**20
    with pytest.raises(ValueError, match="max_rows"):
        dispatch_message_limit(0, 64)


def test_calls_beyond_the_cap_are_refused_and_the_router_waits_them_out() -> None:
    async def main() -> None:
        servicer, server = await _shard(delay_s=0.3, token=TOKEN, max_concurrent_rpcs=2)
        metadata = call_metadata(TOKEN)
        async with grpc.aio.insecure_channel(servicer.address) as channel:
            stub = expert_pb2_grpc.ExpertShardStub(channel)
            codes = await asyncio.gather(*(_code(stub.Dispatch(_request(2), metadata=metadata))
                                           for _ in range(6)))
        busy = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert codes.count(grpc.StatusCode.OK) + busy == 6 and busy >= 1, codes
        # Busy is not fatal: the router backs off and retries (bounded by the wait, not by
        # max_retries), so every dispatch gets through.
        placement = _placement(servicer.address)
        routers = [TokenRouter(lambda: placement, E, token=TOKEN, max_retries=0,
                               wait_for_replica_s=10.0) for _ in range(4)]
        hidden, ids, w = torch.randn(3, H), torch.tensor([1, 2, 3]), torch.rand(3)
        outs = await asyncio.gather(*(r.dispatch(0, hidden, ids, w) for r in routers))
        assert all(torch.equal(o, _compute()(0, hidden, ids, w)) for o in outs)
        assert sum(r.stats.retries for r in routers) >= 1  # some found the shard busy
        for router in routers:
            await router.close()
        await server.stop(None)

    _run(main())


def test_build_app_hands_one_fresh_token_to_shards_and_workers() -> None:
    from zayaserve.cluster.app import build_app
    from zayaserve.replicas.model.checkpoint_paths import resolve_model
    from zayaserve.replicas.model.config import ZayaConfig

    cfg = ClusterConfig.create(model="tiny", expert_shards=2, shard_max_concurrent_calls=9,
                               engine={"max_num_batched_tokens": 100})

    def bound(app: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
        ingress = app._bound_deployment
        workers, _, shards, _ = ingress.init_args
        return (shards._bound_deployment.init_kwargs, workers._bound_deployment.init_kwargs,
                str([*ingress.init_args, *workers._bound_deployment.init_args]))

    shard_kw, worker_kw, positional = bound(build_app(cfg))
    token = shard_kw["rpc_token"]
    assert worker_kw["rpc_token"] == token and len(token) >= 43
    assert token not in positional  # not in the config the ingress gets, nor anywhere else
    hidden = ZayaConfig.from_pretrained(resolve_model("tiny")).hidden_size
    assert shard_kw["max_message_bytes"] == worker_kw["shard_max_message_bytes"] == \
        dispatch_message_limit(100, hidden)
    assert shard_kw["max_concurrent_calls"] == 9
    assert bound(build_app(cfg))[0]["rpc_token"] != token  # one per deployment
    fixed = ClusterConfig.create(model="tiny", shard_max_message_bytes=5000)
    assert bound(build_app(fixed))[0]["max_message_bytes"] == 5000


@pytest.mark.parametrize(("values", "message"), [
    ({"attention_workers": 3, "shard_max_concurrent_calls": 5},
     r"shard_max_concurrent_calls: must be >= attention_workers x engine.micro_batches \(6\)"),
    ({"shard_max_concurrent_calls": 0}, "shard_max_concurrent_calls"),
    ({"shard_max_message_bytes": 10}, "shard_max_message_bytes"),
])
def test_shard_caps_are_validated(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ClusterConfigError, match=message):
        ClusterConfig.create(**values)
    # no shards: the call cap is not used, so not checked against the workers
    ClusterConfig.create(expert_shards=0, attention_workers=3, shard_max_concurrent_calls=5)
