"""The token router against real gRPC expert shards on free ports in this process: routed equals
local, calls overlap, what the shard and the router refuse, and the sync RemoteExpertBackend."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from token_router_helpers import (
    SKIP,
    E,
    H,
    L,
    ckpt,  # noqa: F401 (fixture)
    local,  # noqa: F401 (fixture)
    placement_of,
    routing,
    run,
    start_cluster,
    start_shard,
)

from zayaserve.replicas.model.experts import LocalExpertBackend
from zayaserve.router.placement import PlacementMap
from zayaserve.router.protos import expert_pb2, expert_pb2_grpc
from zayaserve.router.remote_experts import RemoteExpertBackend
from zayaserve.router.shard_server import SERVICE_NAME
from zayaserve.router.tensor_codec import encode
from zayaserve.router.token_router import ExpertShardError, TokenRouter


def test_routed_equals_local_and_skip_rows_are_never_sent(
        ckpt: str, local: LocalExpertBackend) -> None:  # noqa: F811
    async def main() -> None:
        shards, placement = await start_cluster(ckpt, 3)
        router = TokenRouter(lambda: placement, E)
        cases = [routing(37, 1), routing(200, 2), routing(1, 3, 0.0), routing(1, 4, 1.0),
                 routing(50, 5, 1.0), routing(0, 6)]
        expected = Counter[tuple[int, int]]()
        for i, (hidden, ids, w) in enumerate(cases):
            layer = i % L
            out = await router.dispatch(layer, hidden, ids, w)
            assert torch.equal(out, local(layer, hidden, ids, w)), f"case {i}"
            assert not out[ids == SKIP].any()  # exact zeros
            expected.update((layer, e) for e in ids.tolist() if e != SKIP)
        served = Counter[tuple[int, int]]()
        for shard in shards.values():
            served.update(shard.servicer.tokens_served)
        assert served == expected  # every routed row exactly once, no skip row anywhere
        skipped = sum(int((ids == SKIP).sum()) for _, ids, _ in cases)
        assert router.stats.rows_skipped == skipped
        assert router.stats.rows_sent == sum(expected.values())
        assert router.stats.bytes_sent > router.stats.rows_sent * H * 4
        assert router.stats.bytes_received > 0 and router.stats.retries == 0
        assert set(router.stats.layer_latency) == set(range(L))
        flat: dict[str, Any] = {**router.stats.as_dict(), **router.latency_histogram().samples()}
        assert flat["router_rows_skipped_total"] == skipped
        assert flat["router_dispatch_seconds_count"] == len(cases)
        # Every answered call's round trip, per shard id (the placement's names).
        latency = flat.pop("dispatch_latency_seconds_count")
        assert sum(s["value"] for s in latency) == router.stats.calls
        assert {s["shard"] for s in latency} <= set(placement.addresses)
        del flat["dispatch_latency_seconds_bucket"], flat["dispatch_latency_seconds_sum"]
        assert all(isinstance(v, int | float) for v in flat.values())
        await router.close()
        for shard in shards.values():
            await shard.stop()

    run(main())


def test_calls_to_shards_overlap(ckpt: str) -> None:  # noqa: F811
    async def main() -> None:
        shards, placement = await start_cluster(ckpt, 2, delay_s=0.3)
        router = TokenRouter(lambda: placement, E)
        hidden, ids, w = routing(16, 7, 0.0)
        ids[:2] = torch.tensor([0, E - 1])  # rows for both shards
        begin = time.monotonic()
        await router.dispatch(0, hidden, ids, w)
        elapsed = time.monotonic() - begin
        assert router.stats.calls == 2
        # Sequential calls would take >= 0.6 s; concurrent ones ~0.3 s. A generous bound:
        # this checks overlap, not speed.
        assert elapsed < 0.55, elapsed
        await router.close()
        for shard in shards.values():
            await shard.stop()

    run(main())


def test_shard_rejects_what_it_does_not_hold(ckpt: str) -> None:  # noqa: F811
    async def main() -> None:
        shard = await start_shard(ckpt, "lonely", [0, 1, 2, 3])
        async with grpc.aio.insecure_channel(shard.address) as channel:
            stub = expert_pb2_grpc.ExpertShardStub(channel)
            hidden, _, w = routing(3, 15)
            request = expert_pb2.DispatchRequest(
                layer=1, hidden=encode(hidden), expert_ids=[0, 5, SKIP], weights=encode(w))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Dispatch(request)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "does not hold experts [5, 8] of layer 1" in (err.value.details() or "")
            request.expert_ids[:] = [0, 1]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Dispatch(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "expert_ids/weights" in (err.value.details() or "")
            # a router with a wrong map gives up after max_retries, naming the shard's answer
            lying = placement_of({"lonely": range(E)}, {"lonely": shard.address})
            router = TokenRouter(lambda: lying, E, max_retries=1, wait_for_replica_s=5.0)
            ids = torch.tensor([0, 5, SKIP])
            with pytest.raises(ExpertShardError, match="does not hold experts"):
                await router.dispatch(1, hidden, ids, w)
            await router.close()
            assert shard.servicer.rows_served == 0
            # Info and health for the placement controller and probes
            info = await stub.Info(expert_pb2.InfoRequest())
            assert (info.shard_id, info.num_layers) == ("lonely", L)
            assert list(info.experts) == [0, 1, 2, 3] and not info.per_layer
            assert info.address == shard.address and info.expert_bytes > 0 and info.pid > 0
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await shard.stop()

    run(main())


def test_router_checks_its_inputs(ckpt: str) -> None:  # noqa: F811
    placement = placement_of({"a": range(E)}, {"a": "127.0.0.1:1"})
    router = TokenRouter(lambda: placement, E)
    hidden, ids, w = routing(4, 16)
    for bad, field in [((hidden, ids.clamp(max=E) + 1, w), "expert_ids"),
                       ((hidden, ids.int(), w), "expert_ids"),
                       ((hidden, ids, w[:2]), "weights"),
                       ((hidden[0], ids, w), "hidden")]:
        with pytest.raises(ValueError, match=field):
            asyncio.run(router.dispatch(0, *bad))


def test_remote_backend_is_a_sync_expert_backend(ckpt: str, local: LocalExpertBackend) -> None:  # noqa: F811
    maps: list[PlacementMap] = []
    backend = RemoteExpertBackend(lambda: maps[-1], E, timeout_s=30)
    try:
        shards, placement = backend.run(start_cluster(ckpt, 2), timeout=30)
        maps.append(placement)
        assert backend.num_experts == E
        for layer in range(L):
            hidden, ids, w = routing(30, 17 + layer)
            assert torch.equal(backend(layer, hidden, ids, w), local(layer, hidden, ids, w))
        for shard in shards.values():
            backend.run(shard.stop(), timeout=30)
    finally:
        backend.close()
