"""Which expert shards hold which experts: the placement map the token router routes by.

The map is plain data (expert -> ordered shard ids, shard id -> address, a version), so live
migration and hot-expert replication later are just new maps with a higher version: a controller
computes one, shards load the experts, the controller publishes it, routers pick it up on their
next dispatch. Every layer uses the same placement today; `shards_for(layer, expert)` is the one
place a per-layer placement would slot in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType


class PlacementError(ValueError):
    """An impossible placement request or an inconsistent map; the message names the field."""


@dataclass(frozen=True, slots=True)
class PlacementMap:
    """expert -> shard ids holding it (preference order), shard id -> address, and a version.

    An expert may have no replica at all (its only shard died and nobody took over yet): the
    router then waits for a newer map. Versions only grow (and the controller's generation,
    which the worker compares first, survives its restarts): a router adopts a map only when it
    is newer than the one it holds, never an older one. A negative version is allowed as the
    "nothing published yet" placeholder.
    """

    version: int
    num_experts: int
    replicas: Mapping[int, tuple[str, ...]]
    addresses: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise PlacementError(f"num_experts: must be >= 1, got {self.num_experts}")
        replicas = {int(e): tuple(shards) for e, shards in self.replicas.items()}
        for expert, shards in replicas.items():
            if not 0 <= expert < self.num_experts:
                raise PlacementError(
                    f"replicas: expert {expert} out of range for num_experts={self.num_experts}")
            if len(set(shards)) != len(shards):
                raise PlacementError(f"replicas[{expert}]: shard listed twice in {shards}")
            unknown = [s for s in shards if s not in self.addresses]
            if unknown:
                raise PlacementError(f"addresses: no address for shards {unknown}")
        # Read-only views: a published map is shared by every dispatch in flight.
        object.__setattr__(self, "replicas", MappingProxyType(replicas))
        object.__setattr__(self, "addresses", MappingProxyType(dict(self.addresses)))

    def shards_for(self, layer: int, expert: int) -> tuple[str, ...]:
        """The shards that hold `expert` of `layer`, preferred first (empty when none)."""
        del layer  # same placement for every layer (see the module docstring)
        return self.replicas.get(expert, ())


def compute_placement(
    num_experts: int, shard_ids: Sequence[str], replication: int = 1
) -> dict[str, list[int]]:
    """Assign every expert to `replication` distinct shards, as evenly as possible.

    The E*R expert copies are laid out as the expert ids repeated R times and cut into M runs
    whose lengths differ by at most one: each shard gets a contiguous (cyclically) group of
    experts, loads satisfy max - min <= 1, and since R <= M every run is at most E long, so a run
    never holds two copies of the same expert and the R copies of an expert land on R distinct
    shards. With E*R < M some shards get nothing (spares).
    """
    if num_experts < 1:
        raise PlacementError(f"num_experts: must be >= 1, got {num_experts}")
    num_shards = len(shard_ids)
    if num_shards < 1:
        raise PlacementError("shard_ids: need at least one shard")
    if len(set(shard_ids)) != num_shards:
        raise PlacementError(f"shard_ids: duplicates in {list(shard_ids)}")
    if replication < 1:
        raise PlacementError(f"replication: must be >= 1, got {replication}")
    if replication > num_shards:
        raise PlacementError(
            f"replication: {replication} copies of each expert need {replication} distinct "
            f"shards, only {num_shards} given")
    slots = num_experts * replication
    base, extra = divmod(slots, num_shards)
    out: dict[str, list[int]] = {}
    start = 0
    for i, shard in enumerate(shard_ids):
        length = base + (1 if i < extra else 0)
        out[shard] = sorted((start + k) % num_experts for k in range(length))
        start += length
    return out


__all__ = ["PlacementError", "PlacementMap", "compute_placement"]
