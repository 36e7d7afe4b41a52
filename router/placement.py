"""Which expert shards hold which experts: the placement map the token router routes by.

The map is plain data (expert -> ordered shard ids, shard id -> address, a version), so live
migration and hot-expert replication later are just new maps with a higher version: a controller
computes one, shards load the experts, the controller publishes it, routers pick it up on their
next dispatch. Every layer uses the same placement today; `shards_for(layer, expert)` is the one
place a per-layer placement would slot in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType


class PlacementError(ValueError):
    """An impossible placement request or an inconsistent map; the message names the field."""


@dataclass(frozen=True, slots=True)
class ShardRegistration:
    """What a live expert shard announces: where to reach it and the experts it holds."""

    shard_id: str
    address: str  # "host:port"
    experts: tuple[int, ...]  # global expert ids, held in every layer


@dataclass(frozen=True, slots=True)
class PlacementMap:
    """expert -> shard ids holding it (preference order), shard id -> address, and a version.

    An expert may have no replica at all (its only shard died and nobody took over yet): the
    router then waits for a newer map. Versions only grow; a router only asks "is this map a
    different one". A negative version is allowed as the "nothing published yet" placeholder.
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

    def experts_of(self, shard_id: str) -> list[int]:
        return sorted(e for e, shards in self.replicas.items() if shard_id in shards)

    def missing_experts(self) -> list[int]:
        """Experts no shard holds."""
        return [e for e in range(self.num_experts) if not self.replicas.get(e)]

    def bumped(
        self,
        replicas: Mapping[int, Sequence[str]] | None = None,
        addresses: Mapping[str, str] | None = None,
    ) -> PlacementMap:
        """The next version, with the given parts replaced."""
        return PlacementMap(
            version=self.version + 1,
            num_experts=self.num_experts,
            replicas={e: tuple(s) for e, s in (replicas or self.replicas).items()},
            addresses=dict(self.addresses if addresses is None else addresses),
        )

    def with_shard(self, registration: ShardRegistration) -> PlacementMap:
        """Next version with a shard joined or re-registered (e.g. restarted on a new address).

        A re-registered shard keeps its place in each expert's preference order; a new holder
        of an expert is appended, so existing routing stays put.
        """
        held = set(registration.experts)
        replicas: dict[int, tuple[str, ...]] = {}
        for expert in range(self.num_experts):
            shards = tuple(s for s in self.replicas.get(expert, ())
                           if s != registration.shard_id or expert in held)
            if expert in held and registration.shard_id not in shards:
                shards += (registration.shard_id,)
            if shards:
                replicas[expert] = shards
        addresses = {**self.addresses, registration.shard_id: registration.address}
        return PlacementMap(self.version + 1, self.num_experts, replicas, addresses)

    def without_shard(self, shard_id: str) -> PlacementMap:
        """Next version with a shard gone (dead or drained); its experts may end up unplaced."""
        replicas = {e: tuple(s for s in shards if s != shard_id)
                    for e, shards in self.replicas.items()}
        addresses = {s: a for s, a in self.addresses.items() if s != shard_id}
        return PlacementMap(self.version + 1, self.num_experts,
                            {e: s for e, s in replicas.items() if s}, addresses)


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


def placement_from_assignment(
    assignment: Mapping[str, Sequence[int]],
    addresses: Mapping[str, str],
    num_experts: int,
    version: int = 1,
) -> PlacementMap:
    """The map of shard -> experts held; shards listed earlier are preferred for an expert."""
    replicas: dict[int, list[str]] = {}
    for shard, experts in assignment.items():
        for expert in experts:
            replicas.setdefault(int(expert), []).append(shard)
    return PlacementMap(version, num_experts, {e: tuple(s) for e, s in replicas.items()},
                        dict(addresses))


def placement_from_registrations(
    registrations: Iterable[ShardRegistration], num_experts: int, version: int = 1
) -> PlacementMap:
    """The map a controller publishes from the shards that registered with it."""
    regs = list(registrations)
    ids = [r.shard_id for r in regs]
    if len(set(ids)) != len(ids):
        raise PlacementError(f"registrations: shard id registered twice in {ids}")
    return placement_from_assignment(
        {r.shard_id: r.experts for r in regs}, {r.shard_id: r.address for r in regs},
        num_experts, version)


def build_placement(
    num_experts: int, addresses: Mapping[str, str], replication: int = 1, version: int = 1
) -> PlacementMap:
    """compute_placement over the given shards, as a map (shard order = dict order)."""
    return placement_from_assignment(
        compute_placement(num_experts, list(addresses), replication), addresses, num_experts,
        version)


__all__ = [
    "PlacementError", "PlacementMap", "ShardRegistration", "build_placement",
    "compute_placement", "placement_from_assignment", "placement_from_registrations"]
