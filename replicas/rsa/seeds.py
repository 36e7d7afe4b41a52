"""Seeds and aggregation subsets for Markovian RSA, reproducible from one request seed.

A run makes many engine calls; giving each one a seed derived from (request seed, round, index)
makes the whole run replay exactly while keeping every call's sample different from its
siblings'. Hashing (rather than `seed + index`) keeps the seeds of different rounds and
different requests from overlapping.
"""

from __future__ import annotations

import hashlib
import random

# The derived seeds stay inside [0, 2**63): valid for torch.Generator.manual_seed, for
# SamplingParams.seed and for every engine that takes a signed 64-bit seed.
_SEED_BITS = 63

# Path component that marks the subset draw of a round; calls use indices >= 0, so the subset
# RNG never shares a seed with a generation call of the same round.
SUBSET_STREAM = -1


def derive_seed(seed: int | None, *path: int) -> int | None:
    """A stable non-negative 63-bit seed for `path` under `seed`; None stays None (unseeded).

    Stable across processes and Python versions (SHA-256, not `hash()`), so a logged request
    seed is enough to replay any one call of a run.
    """
    if seed is None:
        return None
    text = ":".join(str(int(part)) for part in (seed, *path))
    digest = hashlib.sha256(text.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


def choose_subsets(
    seed: int | None,
    round_index: int,
    population: int,
    k: int,
    count: int,
    rng: random.Random | None = None,
) -> list[list[int]]:
    """For each of `count` new members, min(k, population) distinct indices of the previous round.

    Each member draws its own subset without replacement (a trace never meets itself twice in
    one prompt), independently of the other members (a trace may feed several members). The
    draw comes from `rng` when given (tests and callers that manage their own randomness);
    otherwise from a Random seeded by derive_seed(seed, round_index, -1), or a fresh,
    OS-seeded Random when `seed` is None.
    """
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if rng is None:
        derived = derive_seed(seed, round_index, SUBSET_STREAM)
        rng = random.Random() if derived is None else random.Random(derived)
    size = min(k, population)
    return [rng.sample(range(population), size) for _ in range(count)]
