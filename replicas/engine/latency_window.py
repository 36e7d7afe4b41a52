"""This engine's recent time to first token and inter-token latency, as percentiles: what an
attention worker reports for the autoscaler's latency targets (`max_ttft_s`, `max_itl_s`).

A TTFT is recorded when a request's first token comes out, an ITL (its decode time over its
tokens after the first, per sequence) when it finishes. Only the last `window_s` seconds count,
and at most `max_samples` of each, so a burst long past does not hold a pool up."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LatencyPercentiles:
    """The `q` percentile of each over the window (None: no sample in it)."""

    q: float
    ttft_s: float | None
    itl_s: float | None
    samples: int  # TTFTs in the window
    itl_samples: int = 0  # finished requests in the window


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank `q` percentile (None: no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class LatencyWindow:
    def __init__(self, window_s: float = 30.0, max_samples: int = 2048) -> None:
        self.window_s = window_s
        self._ttft: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (when, seconds)
        self._itl: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add_ttft(self, seconds: float, now: float) -> None:
        self._ttft.append((now, seconds))

    def add_itl(self, seconds: float, now: float) -> None:
        self._itl.append((now, seconds))

    def percentiles(self, q: float = 0.9, now: float | None = None) -> LatencyPercentiles:
        now = time.monotonic() if now is None else now
        # Asked from other threads while the engine thread appends: list() copies a deque
        # atomically; old samples are filtered out, not popped (maxlen bounds the deques).
        ttfts = [s for when, s in list(self._ttft) if now - when <= self.window_s]
        itls = [s for when, s in list(self._itl) if now - when <= self.window_s]
        return LatencyPercentiles(q, percentile(ttfts, q), percentile(itls, q), len(ttfts),
                                  len(itls))
