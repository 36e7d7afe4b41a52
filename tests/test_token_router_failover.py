"""The token router when shards go away: replicated experts fail over, a restarted shard on a
new address is waited for, and with no replica at all it raises within its bound."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import torch
from token_router_helpers import (
    E,
    ckpt,  # noqa: F401 (fixture)
    local,  # noqa: F401 (fixture)
    routing,
    run,
    start_cluster,
    start_shard,
)

from zayaserve.replicas.model.experts import LocalExpertBackend
from zayaserve.router.placement import PlacementMap
from zayaserve.router.token_router import NoExpertReplicaError, TokenRouter


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


def test_replicated_experts_fail_over_when_a_shard_dies(
        ckpt: str, local: LocalExpertBackend) -> None:  # noqa: F811
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
        ckpt: str, local: LocalExpertBackend) -> None:  # noqa: F811
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


def test_no_replica_ever_raises_within_the_bound(ckpt: str) -> None:  # noqa: F811
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
