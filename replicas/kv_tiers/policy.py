"""Policies of the L2 tier, free of any network code: when to stop calling Redis (a circuit
breaker) and when fetching a block beats recomputing it (a transfer cost model)."""

from __future__ import annotations

import threading
import time


class CircuitBreaker:
    """closed -> (N consecutive failures) -> open -> (reset_s) -> half-open: one probe."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self._threshold = max(1, failures)
        self._reset_s = reset_s
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None  # None: closed
        self._probe_at: float | None = None  # when the half-open probe was handed out

    def blocked(self) -> bool:
        """Open and not yet due for a probe (no side effects)."""
        with self._lock:
            return self._opened_at is not None and not self._probe_due(time.monotonic())

    def _probe_due(self, now: float) -> bool:
        assert self._opened_at is not None
        if now - self._opened_at < self._reset_s:
            return False
        # A probe whose caller never reported (it should not happen) must not wedge the
        # breaker half-open forever: after another reset_s a new probe is allowed.
        return self._probe_at is None or now - self._probe_at >= self._reset_s

    def allow(self) -> bool:
        """May this call touch the network? Hands out the single half-open probe."""
        with self._lock:
            if self._opened_at is None:
                return True
            now = time.monotonic()
            if not self._probe_due(now):
                return False
            self._probe_at = now
            return True

    def success(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._probe_at = 0, None, None

    def failure(self) -> bool:
        """Record a failure; True when this one opened (or re-opened) the breaker."""
        with self._lock:
            self._failures += 1
            now = time.monotonic()
            if self._opened_at is not None:  # the half-open probe failed
                self._opened_at, self._probe_at = now, None
                return True
            if self._failures >= self._threshold:
                self._opened_at = now
                return True
            return False


class TransferModel:
    """Estimated L2 fetch time, rtt + bytes / bandwidth, from observed reads (EWMA) unless
    overridden. Priors are used until the first observation."""

    PRIOR_BYTES_PER_S = 1.0e9
    PRIOR_RTT_S = 1e-3
    SMALL_READ_BYTES = 64 * 1024  # reads below this mostly measure the round trip

    def __init__(
        self, bytes_per_s: float | None = None, rtt_s: float | None = None, *, alpha: float = 0.2
    ) -> None:
        self._bw_override, self._rtt_override = bytes_per_s, rtt_s
        self._alpha = alpha
        self._bw: float | None = None
        self._rtt: float | None = None
        self._lock = threading.Lock()

    @property
    def bytes_per_s(self) -> float:
        return self._bw_override or self._bw or self.PRIOR_BYTES_PER_S

    @property
    def rtt_s(self) -> float:
        if self._rtt_override is not None:
            return self._rtt_override
        return self._rtt if self._rtt is not None else self.PRIOR_RTT_S

    def observe(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            if nbytes < self.SMALL_READ_BYTES:
                self._rtt = seconds if self._rtt is None else (
                    self._alpha * seconds + (1 - self._alpha) * self._rtt)
                return
            # Never credit more than twice the apparent rate to a read faster than the RTT.
            sample = nbytes / max(seconds - self.rtt_s, seconds / 2, 1e-9)
            self._bw = sample if self._bw is None else (
                self._alpha * sample + (1 - self._alpha) * self._bw)

    def transfer_s(self, payload_bytes: int) -> float:
        return self.rtt_s + payload_bytes / self.bytes_per_s

    def should_fetch(
        self, num_tokens: int, payload_bytes: int, recompute_tokens_per_s: float
    ) -> bool:
        """Fetch from L2 only when that is estimated faster than recomputing the tokens."""
        if num_tokens <= 0:
            return False
        if recompute_tokens_per_s <= 0:
            raise ValueError(f"recompute_tokens_per_s must be > 0, got {recompute_tokens_per_s}")
        return self.transfer_s(payload_bytes) < num_tokens / recompute_tokens_per_s
