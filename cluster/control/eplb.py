"""Expert-parallel load balancing (EPLB) for a top-1 MoE with a skip class: the pure logic.

A token goes to one of E experts or to the skip class (id E, free for the expert pool). Every
layer shares one placement (`placement.py`), so an expert's load is summed over layers. A
controller tracks load (`LoadTracker`), plans (`plan_placement`: a primary per expert, redundant
replicas for the hottest, greedy LPT layout, sticky to the current one, capacity-bounded), and
switches only when the gain pays for the moves (`should_rebalance`). Spreading tokens over an
expert's replicas is the token router's (`_plan`: fewest rows in flight). Bad arguments raise
`PlacementError` (a `ValueError`) naming them.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Mapping, Sequence

from zayaserve.router.placement import PlacementError

Replicas = Mapping[int, Sequence[str]]


class LoadTracker:
    """EWMA of per-step token counts per expert, alpha = 2 / (window_steps + 1).

    The first step seeds the average (no warm-up bias towards zero), then m <- alpha * count +
    (1 - alpha) * m. Skip tokens are averaged alike but only show in `skip_share`, not `load()`.
    """

    def __init__(self, num_experts: int, window_steps: int) -> None:
        for name, value in (("num_experts", num_experts), ("window_steps", window_steps)):
            if value < 1:
                raise PlacementError(f"{name}: must be >= 1, got {value}")
        self.num_experts = num_experts
        self.alpha = 2.0 / (window_steps + 1)
        self.steps = 0
        self._ewma: list[float] = [0.0] * (num_experts + 1)  # experts, then skip

    def observe(self, counts: Sequence[float]) -> None:
        """Fold in one step's counts: E expert entries, then the skip count."""
        if len(counts) != self.num_experts + 1:
            raise PlacementError(f"counts: need num_experts + 1 = {self.num_experts + 1} entries "
                                 f"(the last = skip), got {len(counts)}")
        values = _non_negative(counts, "counts")
        a = self.alpha if self.steps else 1.0  # the first step seeds the average
        self._ewma = [a * c + (1.0 - a) * m for c, m in zip(values, self._ewma, strict=True)]
        self.steps += 1

    def load(self) -> list[float]:
        """The per-expert EWMA (skip excluded); all zeros before the first step."""
        return self._ewma[:-1]

    @property
    def skip_share(self) -> float:
        """EWMA skip tokens / EWMA all tokens (0.0 while nothing was seen)."""
        total = sum(self._ewma)
        return self._ewma[-1] / total if total > 0 else 0.0


def _non_negative(values: Sequence[float], name: str = "load") -> list[float]:
    out = [float(v) for v in values]
    bad = [v for v in out if not (v >= 0 and math.isfinite(v))]
    if bad or not out:
        raise PlacementError(f"{name}: need finite entries >= 0 (one per expert), got {bad or out}")
    return out


def _check_shards(shards: Sequence[str]) -> list[str]:
    names = list(shards)
    if not names or len(set(names)) != len(names):
        raise PlacementError(f"shards: need at least one shard, no duplicates; got {names}")
    return names


def shard_loads(load: Sequence[float], replicas: Replicas, shards: Sequence[str]
                ) -> dict[str, float]:
    """Load per shard (all of `shards`): each expert's load split evenly over its replicas."""
    loads = _non_negative(load)
    out = dict.fromkeys(_check_shards(shards), 0.0)
    for expert, held in replicas.items():
        if not 0 <= expert < len(loads):
            raise PlacementError(f"load: no entry for expert {expert} (len(load)={len(loads)})")
        if len(set(held)) != len(held):
            raise PlacementError(f"replicas[{expert}]: shard listed twice in {list(held)}")
        for shard in held:
            if shard not in out:
                raise PlacementError(f"replicas[{expert}]: shard {shard!r} not in shards")
            out[shard] += loads[expert] / len(held)
    return out


def balancedness(loads: Mapping[str, float]) -> float:
    """Mean over max shard load: 1.0 is perfect (and the answer when every load is zero)."""
    values = list(loads.values())
    if not values:
        raise PlacementError("shard_loads: need at least one shard")
    peak = max(values)
    return 1.0 if peak <= 0 else sum(values) / len(values) / peak


def _replica_counts(loads: list[float], num_shards: int, redundant: int) -> list[int]:
    """One replica each, then each extra to the highest per-replica load (ties: fewer replicas,
    lower id), never more than `num_shards` replicas of one expert."""
    counts = [1] * len(loads)
    heap = [(-w, 1, e) for e, w in enumerate(loads)] if num_shards > 1 else []
    heapq.heapify(heap)
    for _ in range(redundant):
        _, _, expert = heapq.heappop(heap)
        counts[expert] += 1
        if counts[expert] < num_shards:
            heapq.heappush(heap, (-loads[expert] / counts[expert], counts[expert], expert))
    return counts


def _feasible(demands: list[int], free: list[int]) -> bool:
    """Do experts needing `demands` distinct shards fit in shards with `free` slots? By max-flow,
    iff the k largest demands fit in sum(min(free, k)) for every k (= the total once k >= max)."""
    top, prefix = max(free, default=0), 0
    for k, need in enumerate(sorted(demands, reverse=True)[:top], start=1):
        prefix += need
        if prefix > sum(min(f, k) for f in free):
            return False
    return sum(demands) <= sum(free)


def _assign(loads: list[float], counts: list[int], num_shards: int, cap: int,
            prefer: list[list[int]], limit: float) -> tuple[list[list[int]], float]:
    """Greedy LPT layout, shard indices per expert: heaviest replica first, onto the least loaded
    shard with a free slot not holding that expert, or onto a `prefer`red one (its current) that
    stays <= `limit`. A choice that leaves the rest unplaceable (capacity) is swapped for the
    shards with the most free slots, which (exchange argument) always keeps them placeable.
    Returns the layout and its peak shard load."""
    order = sorted(range(len(loads)), key=lambda e: (-loads[e] / counts[e], e))
    fill, free = [0.0] * num_shards, [cap] * num_shards
    out: list[list[int]] = [[] for _ in loads]
    for i, expert in enumerate(order):
        weight = loads[expert] / counts[expert]
        chosen: list[int] = []
        for _ in range(counts[expert]):
            open_ = [s for s in range(num_shards) if free[s] > 0 and s not in chosen]
            sticky = [s for s in prefer[expert] if s in open_ and fill[s] + weight <= limit]
            chosen.append(min(sticky or open_, key=lambda s: (fill[s], -free[s], s)))
        left = [free[s] - (s in chosen) for s in range(num_shards)]
        if not _feasible([counts[e] for e in order[i + 1:]], left):
            by_room = sorted(range(num_shards), key=lambda s: (-free[s], fill[s], s))
            chosen = by_room[:counts[expert]]
        for s in chosen:
            fill[s] += weight
            free[s] -= 1
        out[expert] = chosen
    return out, max(fill)


def _improve(layout: list[list[int]], loads: list[float], counts: list[int], num_shards: int,
             cap: int) -> tuple[list[list[int]], float]:
    """Local search after the greedy layout: while some move of one copy off the fullest shard,
    or swap of it with a lighter copy elsewhere, leaves both shards below the old peak, make the
    best such change. Keeps the rules (a shard holds an expert once, at most `cap` copies);
    returns the layout and its peak. Deterministic, so improving its own result changes nothing."""
    out = [list(held) for held in layout]
    weight = [w / c for w, c in zip(loads, counts, strict=True)]
    for _ in range(4 * len(loads) * num_shards):
        fill = [0.0] * num_shards
        held_by: list[set[int]] = [set() for _ in range(num_shards)]
        for e, shards in enumerate(out):
            for s in shards:
                fill[s] += weight[e]
                held_by[s].add(e)
        peak = max(fill)
        top = min(range(num_shards), key=lambda s: (-fill[s], s))
        best: tuple[float, int, int, int | None] | None = None  # (new pair max, e, t, f)
        for e in sorted(held_by[top]):
            for t in range(num_shards):
                if t == top or e in held_by[t]:
                    continue
                if len(held_by[t]) < cap:  # move e: top -> t
                    pair = max(fill[top] - weight[e], fill[t] + weight[e])
                    if pair < peak - 1e-12 and (best is None or pair < best[0]):
                        best = (pair, e, t, None)
                for f in sorted(held_by[t] - held_by[top]):  # swap e (top) with f (t)
                    if weight[f] < weight[e]:
                        delta = weight[e] - weight[f]
                        pair = max(fill[top] - delta, fill[t] + delta)
                        if pair < peak - 1e-12 and (best is None or pair < best[0]):
                            best = (pair, e, t, f)
        if best is None:
            return out, peak
        _, moved, to, back = best
        out[moved] = sorted(to if s == top else s for s in out[moved])
        if back is not None:
            out[back] = sorted(top if s == to else s for s in out[back])
    return out, max(sum(weight[e] for e, shards in enumerate(out) if s in shards)
                    for s in range(num_shards))


def _preferences(current: Replicas, names: list[str], num_experts: int) -> list[list[int]]:
    index = {name: i for i, name in enumerate(names)}
    prefer: list[list[int]] = [[] for _ in range(num_experts)]
    for expert, held in current.items():
        if not 0 <= expert < num_experts:
            raise PlacementError(f"current: expert {expert} not in range(len(load)={num_experts})")
        prefer[expert] = [index[s] for s in held if s in index]  # gone shards are dropped
    return prefer


def _relabel(layout: list[list[int]], prefer: list[list[int]], num_shards: int
             ) -> list[list[int]]:
    """The same layout with its shards renamed (loads unchanged) to overlap `prefer` the most,
    by greedy matching on the count of experts a (planned, current) shard pair shares."""
    overlap = Counter((s, t) for held, want in zip(layout, prefer, strict=True)
                      for s in held for t in want)
    rename: dict[int, int] = {}
    for s, t in sorted(overlap, key=lambda pair: (-overlap[pair], pair)):
        if s not in rename and t not in rename.values():
            rename[s] = t
    spare = iter(t for t in range(num_shards) if t not in rename.values())
    rename.update({s: next(spare) for s in range(num_shards) if s not in rename})
    return [[rename[s] for s in held] for held in layout]


def plan_placement(load: Sequence[float], shards: Sequence[str], redundant_experts: int = 0,
                   current: Replicas | None = None) -> dict[int, tuple[str, ...]]:
    """expert -> shards holding its replicas (primary first), for `PlacementMap.replicas`.

    `redundant_experts` extra replicas go greedily to the expert with the highest per-replica
    load; the layout is greedy LPT, then improved by local search (`_improve`), under two rules:
    no shard holds an expert twice, and no shard holds more than
    ceil((E + redundant_experts) / len(shards)) experts. With `current`, the
    fewest-moves one of: that plan, that plan with its shards renamed to match `current`, and a
    plan keeping experts on their current shards wherever that stays under the first's peak.
    """
    loads, names = _non_negative(load), _check_shards(shards)
    num_experts, num_shards = len(loads), len(names)
    if not 0 <= redundant_experts <= num_experts * (num_shards - 1):
        raise PlacementError(f"redundant_experts: must be in [0, {num_experts * (num_shards - 1)}]"
                             f" (one replica of an expert a shard), got {redundant_experts}")
    counts = _replica_counts(loads, num_shards, redundant_experts)
    cap = math.ceil((num_experts + redundant_experts) / num_shards)
    layout, peak = _improve(*_assign(loads, counts, num_shards, cap, [[] for _ in loads],
                                     -math.inf)[:1], loads, counts, num_shards, cap)
    if current:  # candidates all within the plain plan's peak: the fewest moves wins
        prefer = _preferences(current, names, num_experts)
        limit = peak * (1 + 1e-9)  # float slack: the same sums in another order
        sticky, sticky_peak = _assign(loads, counts, num_shards, cap, prefer, limit)
        if sticky_peak > limit:  # the greedy sticky layout fell short: improve it, if it can
            sticky, sticky_peak = _improve(sticky, loads, counts, num_shards, cap)
        options = [layout, _relabel(layout, prefer, num_shards)]
        if sticky_peak <= limit:
            options.append(sticky)
        layout = min(options, key=lambda opt: sum(
            len(set(held) - set(want)) for held, want in zip(opt, prefer, strict=True)))
    return {e: tuple(names[s] for s in held) for e, held in enumerate(layout)}


def moves(current: Replicas, proposed: Replicas) -> int:
    """Replica copies to load: (expert, shard) pairs in `proposed` but not in `current`."""
    return sum(len(set(held) - set(current.get(e, ()))) for e, held in proposed.items())


def should_rebalance(load: Sequence[float], current: Replicas, proposed: Replicas,
                     shards: Sequence[str], min_gain: float, move_cost_per_expert: float
                     ) -> bool:
    """Worth switching? gain = balancedness(proposed) - balancedness(current), both under `load`.

    Yes iff gain >= `min_gain` and gain > moves(current, proposed) * `move_cost_per_expert`.
    Units: balancedness points (0..1) for `min_gain`; balancedness points per replica copy loaded
    (the gain one expert move must buy) for `move_cost_per_expert`. Balance only: experts with
    no replica in `current` are the controller's to repair whatever this answers.
    """
    for name, value in (("min_gain", min_gain), ("move_cost_per_expert", move_cost_per_expert)):
        if not value >= 0:
            raise PlacementError(f"{name}: must be >= 0, got {value}")
    gain = (balancedness(shard_loads(load, proposed, shards))
            - balancedness(shard_loads(load, current, shards)))
    return gain >= min_gain and gain > moves(current, proposed) * move_cost_per_expert


__all__ = ["LoadTracker", "balancedness", "moves", "plan_placement",
           "shard_loads", "should_rebalance"]
