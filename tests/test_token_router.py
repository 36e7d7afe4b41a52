"""The token router against real gRPC expert shards on free ports in this process."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from zayaserve.replicas.model.experts import ExpertWeights, LocalExpertBackend, run_grouped
from zayaserve.replicas.model.loader import load_expert_side
from zayaserve.router.placement import PlacementMap, compute_placement
from zayaserve.router.protos import expert_pb2, expert_pb2_grpc
from zayaserve.router.remote_experts import RemoteExpertBackend
from zayaserve.router.shard_server import SERVICE_NAME, ExpertShardServicer, serve_shard
from zayaserve.router.tensor_codec import encode
from zayaserve.router.token_router import ExpertShardError, NoExpertReplicaError, TokenRouter

E, L, H = 8, 4, 64  # the tiny preset
SKIP = E


@functools.cache
def _experts(path: str, experts: tuple[int, ...]) -> list[ExpertWeights]:
    return load_expert_side(path, experts=list(experts), dtype=torch.float32)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Path) -> str:
    return str(tiny_checkpoint)


@pytest.fixture(scope="module")
def local(ckpt: str) -> LocalExpertBackend:
    return LocalExpertBackend(load_expert_side(ckpt, dtype=torch.float32), num_experts=E)


@dataclass
class Shard:
    servicer: ExpertShardServicer
    server: grpc.aio.Server
    address: str

    async def stop(self) -> None:
        await self.server.stop(None)


async def start_shard(ckpt: str, shard_id: str, experts: Sequence[int],
                      delay_s: float = 0.0) -> Shard:
    layers = _experts(ckpt, tuple(experts))

    def compute(layer: int, hidden: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        if delay_s:
            time.sleep(delay_s)  # a slow expert GEMM, on the servicer's worker thread
        return run_grouped(layers[layer], hidden, ids, weights)

    servicer = ExpertShardServicer(shard_id, compute, list(experts),
                                   sum(w.nbytes for w in layers), num_layers=len(layers))
    server, _ = await serve_shard(servicer, host="127.0.0.1", port=0)
    return Shard(servicer, server, servicer.address)


def placement_of(assignment: Mapping[str, Sequence[int]], addresses: Mapping[str, str],
                 version: int = 1) -> PlacementMap:
    """The map of shard -> experts held; shards listed earlier are preferred for an expert."""
    replicas: dict[int, tuple[str, ...]] = {}
    for shard, experts in assignment.items():
        for expert in experts:
            replicas[expert] = (*replicas.get(expert, ()), shard)
    return PlacementMap(version, E, replicas, addresses)


def experts_of(placement: PlacementMap, shard: str) -> list[int]:
    return sorted(e for e, shards in placement.replicas.items() if shard in shards)


def moved(placement: PlacementMap, shard: str, address: str) -> PlacementMap:
    """The next version, with `shard` (restarted) listening on a new address."""
    return replace(placement, version=placement.version + 1,
                   addresses={**placement.addresses, shard: address})


def without(placement: PlacementMap, shard: str) -> PlacementMap:
    """The next version, with `shard` gone; its experts may end up unplaced."""
    replicas = {e: tuple(s for s in shards if s != shard)
                for e, shards in placement.replicas.items()}
    return PlacementMap(placement.version + 1, E, {e: s for e, s in replicas.items() if s},
                        {s: a for s, a in placement.addresses.items() if s != shard})


async def start_cluster(ckpt: str, num_shards: int, replication: int = 1,
                        delay_s: float = 0.0) -> tuple[dict[str, Shard], PlacementMap]:
    """Shards placed by compute_placement; the map they register as."""
    assignment = compute_placement(E, [f"s{i}" for i in range(num_shards)], replication)
    shards = {s: await start_shard(ckpt, s, experts, delay_s) for s, experts in assignment.items()}
    return shards, placement_of(assignment, {s: sh.address for s, sh in shards.items()})


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=30))


def routing(tokens: int, seed: int, skip_share: float = 0.25
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=g)
    ids = torch.randint(0, E, (tokens,), generator=g)
    ids[torch.rand(tokens, generator=g) < skip_share] = SKIP
    return hidden, ids, torch.rand(tokens, generator=g)


def test_routed_equals_local_and_skip_rows_are_never_sent(
        ckpt: str, local: LocalExpertBackend) -> None:
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
        flat = router.stats_dict()
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


def test_calls_to_shards_overlap(ckpt: str) -> None:
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


def test_replicated_experts_fail_over_when_a_shard_dies(
        ckpt: str, local: LocalExpertBackend) -> None:
    async def main() -> None:
        shards, placement = await start_cluster(ckpt, 3, replication=2, delay_s=0.05)
        router = TokenRouter(lambda: placement, E, wait_for_replica_s=5.0)
        hidden, ids, w = routing(64, 8, 0.1)
        in_flight = asyncio.ensure_future(router.dispatch(1, hidden, ids, w))
        await asyncio.sleep(0.02)  # the calls are on the wire (shards take 0.05 s)
        await shards["s1"].stop()
        assert torch.equal(await in_flight, local(1, hidden, ids, w))
        assert router.stats.retries >= 1  # s1's rows were in flight when it went away
        for seed in range(9, 13):  # later dispatches keep working without s1
            hidden, ids, w = routing(64, seed)
            assert torch.equal(await router.dispatch(2, hidden, ids, w), local(2, hidden, ids, w))
        assert router.stats.rows_retried > 0
        assert router.stats.replica_waits == 0  # a replica was always there: no waiting
        await router.close()
        for name in ("s0", "s2"):
            await shards[name].stop()

    run(main())


def test_waits_for_a_restarted_shard_on_a_new_address(
        ckpt: str, local: LocalExpertBackend) -> None:
    async def main() -> None:
        shards, placement = await start_cluster(ckpt, 2)
        current = {"map": placement}
        router = TokenRouter(lambda: current["map"], E, wait_for_replica_s=10.0)
        await shards["s1"].stop()
        hidden, ids, w = routing(48, 13)
        ids[0] = E - 1  # s1's experts are needed
        begin = time.monotonic()
        waiting = asyncio.ensure_future(router.dispatch(3, hidden, ids, w))
        await asyncio.sleep(1.0)
        assert not waiting.done()
        experts = experts_of(placement, "s1")
        replacement = await start_shard(ckpt, "s1", experts)
        assert replacement.address != placement.addresses["s1"]
        current["map"] = moved(placement, "s1", replacement.address)
        assert torch.equal(await waiting, local(3, hidden, ids, w))
        assert 1.0 <= time.monotonic() - begin < 5.0
        assert router.stats.replica_waits > 0 and router.stats.map_versions_seen == 2
        await router.close()
        await shards["s0"].stop()
        await replacement.stop()

    run(main())


def test_no_replica_ever_raises_within_the_bound(ckpt: str) -> None:
    async def main() -> None:
        shards, placement = await start_cluster(ckpt, 2)
        hidden, ids, w = routing(20, 14, 0.0)
        ids[3] = 6
        # (1) the map never names a holder of experts 4..7
        partial = without(placement, "s1")
        router = TokenRouter(lambda: partial, E, wait_for_replica_s=0.4)
        begin = time.monotonic()
        with pytest.raises(NoExpertReplicaError, match=r"experts \[.*6.*\] of layer 2") as err:
            await router.dispatch(2, hidden, ids, w)
        assert 0.4 <= time.monotonic() - begin < 2.0
        assert 6 in err.value.experts and 0 not in err.value.experts
        # (2) the map names a holder that is down and never comes back
        await shards["s1"].stop()
        router = TokenRouter(lambda: placement, E, wait_for_replica_s=0.4)
        begin = time.monotonic()
        with pytest.raises(NoExpertReplicaError, match="UNAVAILABLE"):
            await router.dispatch(2, hidden, ids, w)
        assert time.monotonic() - begin < 2.0
        await router.close()
        await shards["s0"].stop()

    run(main())


def test_shard_rejects_what_it_does_not_hold(ckpt: str) -> None:
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


def test_router_checks_its_inputs(ckpt: str) -> None:
    placement = placement_of({"a": range(E)}, {"a": "127.0.0.1:1"})
    router = TokenRouter(lambda: placement, E)
    hidden, ids, w = routing(4, 16)
    for bad, field in [((hidden, ids.clamp(max=E) + 1, w), "expert_ids"),
                       ((hidden, ids.int(), w), "expert_ids"),
                       ((hidden, ids, w[:2]), "weights"),
                       ((hidden[0], ids, w), "hidden")]:
        with pytest.raises(ValueError, match=field):
            asyncio.run(router.dispatch(0, *bad))


def test_remote_backend_is_a_sync_expert_backend(ckpt: str, local: LocalExpertBackend) -> None:
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
