"""What the token router tests share: the tiny preset's sizes, its experts, real gRPC expert
shards on free ports in this process, the placement map they register as, and random routing."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from zayaserve.replicas.model.experts import ExpertWeights, LocalExpertBackend, run_grouped
from zayaserve.replicas.model.loader import load_expert_side
from zayaserve.router.placement import PlacementMap, compute_placement
from zayaserve.router.shard_server import ExpertShardServicer, serve_shard

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
