"""L2 prefix-block store on a shared Redis: a Redis outage costs speed, never answers.

Writes never block the engine step: `put_async` only appends to a bounded in-memory queue that a
background thread drains into pipelined `SET key value EX ttl`; a full queue drops the write
(counted). Reads are one pipelined round trip each. Every network error or timeout feeds a
circuit breaker: after `breaker_failures` consecutive failures it opens and every call answers
"miss" / False at once without touching the network; after `breaker_reset_s` one call probes
(half-open) and its success closes the breaker again.

Reads are synchronous and bounded by `timeout_s` (once per call at most, no retries: the
breaker is the retry policy); call them off the event loop if even that is too long.

The password: the URL's (redis://:pw@host), else $ZAYASERVE_REDIS_PASSWORD (what the Helm chart
hands attention workers from a Secret, so it is never in the Serve config); it is never logged.
TLS: a rediss:// URL.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from zayaserve.replicas.kv_tiers.hashing import BlockHash
from zayaserve.replicas.kv_tiers.policy import CircuitBreaker, TransferModel

__all__ = ["CircuitBreaker", "RedisBlockStore", "StoreStats", "TransferModel"]

logger = logging.getLogger(__name__)

# Per write pipeline: enough to amortise the round trip, bounded so that one failed pipeline
# drops little and one send never has to move more than a few tens of MB.
_BATCH_ITEMS = 64
_BATCH_BYTES = 32 * 2**20
# The password for a URL that carries none (a Kubernetes Secret, as env).
PASSWORD_ENV = "ZAYASERVE_REDIS_PASSWORD"


@dataclass(frozen=True, slots=True)
class StoreStats:
    hits: int = 0  # blocks returned by get_many
    misses: int = 0  # blocks asked for and not returned (absent, after a miss, or unavailable)
    writes: int = 0  # blocks acknowledged by Redis
    writes_dropped: int = 0  # queue full, breaker open, or the write failed
    errors: int = 0  # failed round trips (network, timeout, auth, server error)
    breaker_opens: int = 0
    bytes_written: int = 0
    bytes_read: int = 0


class RedisBlockStore:
    """Shared prefix blocks keyed by `BlockHash`. No method raises on Redis trouble."""

    def __init__(
        self, url: str, *, ttl_s: int | None = 3600, timeout_s: float = 0.5, pool_size: int = 8,
        write_queue: int = 256, write_queue_bytes: int = 256 * 2**20, breaker_failures: int = 3,
        breaker_reset_s: float = 2.0, key_prefix: str = "zayaserve:kv:",
        transfer: TransferModel | None = None,
    ) -> None:
        self._ttl = ttl_s
        self._prefix = key_prefix.encode()
        # Blocking pool: a burst of readers waits up to timeout_s for a connection instead of
        # failing (which the breaker would read as an outage). No retries: see the module doc.
        auth: dict[str, str] = {}
        if not urlsplit(url).password and os.environ.get(PASSWORD_ENV):
            auth["password"] = os.environ[PASSWORD_ENV]
        self._pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=timeout_s, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0), **auth)
        self._client = redis.Redis(connection_pool=self._pool)
        self.breaker = CircuitBreaker(breaker_failures, breaker_reset_s)
        self.transfer = transfer or TransferModel()
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._max_items, self._max_bytes = write_queue, write_queue_bytes
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._queue: deque[tuple[BlockHash, bytes]] = deque()
        self._queued_bytes = 0
        self._in_flight = 0
        self._closing = False
        self._writer = threading.Thread(target=self._write_loop, name="zayaserve-l2-writer",
                                        daemon=True)
        self._writer.start()

    # -- public API --------------------------------------------------------------------------

    @property
    def stats(self) -> StoreStats:
        with self._counts_lock:
            return StoreStats(**self._counts)

    @property
    def available(self) -> bool:
        """False while the breaker is open: skip L2 planning entirely."""
        return not self.breaker.blocked()

    def put_async(self, block_hash: BlockHash, payload: bytes) -> bool:
        """Queue a write; False (and counted as dropped) when it cannot be queued. Never waits
        on the network."""
        if not self.breaker.blocked():
            with self._lock:
                fits = (len(self._queue) < self._max_items
                        and self._queued_bytes + len(payload) <= self._max_bytes)
                if fits and not self._closing:
                    self._queue.append((block_hash, payload))
                    self._queued_bytes += len(payload)
                    self._has_work.notify()
                    return True
        self._count(writes_dropped=1)
        return False

    def get_many(self, hashes: Sequence[BlockHash]) -> list[bytes | None]:
        """Payloads of the leading blocks that exist, then None for the first miss (omitted when
        all hit): one pipelined round trip. A hit refreshes the block's TTL."""
        if not hashes:
            return []
        start = time.perf_counter()
        values = self._round_trip("get", hashes)
        if values is None:
            self._count(misses=len(hashes))
            return [None]
        out: list[bytes | None] = []
        for value in values:
            out.append(value)
            if value is None:
                break
        hits = len(out) - (out[-1] is None)
        received = sum(len(v) for v in values if v is not None)
        self.transfer.observe(received, time.perf_counter() - start)
        self._count(hits=hits, misses=len(hashes) - hits, bytes_read=received)
        return out

    def contains_prefix(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks exist (pipelined EXISTS); 0 when Redis is unavailable."""
        if not hashes:
            return 0
        start = time.perf_counter()
        found = self._round_trip("exists", hashes)
        if found is None:
            return 0
        self.transfer.observe(0, time.perf_counter() - start)
        return next((i for i, n in enumerate(found) if not n), len(found))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued write was sent (or dropped); False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._queue and not self._in_flight,
                                       timeout_s)

    def close(self) -> None:
        """Send what is queued (bounded by the breaker and timeouts), stop, disconnect."""
        with self._lock:
            self._closing = True
            self._has_work.notify()
        self._writer.join()
        self._client.close()
        self._pool.disconnect()

    def __enter__(self) -> RedisBlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _key(self, block_hash: BlockHash) -> bytes:
        # Hex keeps keys readable in redis-cli; 64 bytes of key next to a ~1 MB value is noise.
        return self._prefix + block_hash.hex().encode()

    def _count(self, **deltas: int) -> None:
        with self._counts_lock:
            self._counts.update(deltas)

    def _round_trip(self, op: str, hashes: Sequence[BlockHash]) -> list[Any] | None:
        """One pipeline of `op` per hash; None when the breaker or Redis says no."""
        if not self.breaker.allow():
            return None
        try:
            pipe = self._client.pipeline(transaction=False)
            for h in hashes:
                if op == "exists":
                    pipe.exists(self._key(h))
                elif self._ttl is not None:
                    pipe.getex(self._key(h), ex=self._ttl)
                else:
                    pipe.get(self._key(h))
            values: list[Any] = pipe.execute()
        except Exception as err:  # network, timeout, auth, server: all mean "L2 is not there"
            self._failed(err)
            return None
        self.breaker.success()
        return values

    def _failed(self, err: Exception) -> None:
        opened = self.breaker.failure()
        self._count(errors=1, breaker_opens=int(opened))
        if opened:
            logger.warning("Redis L2 cache unavailable (%s: %s); serving without it",
                           type(err).__name__, err)
        else:
            logger.debug("Redis L2 cache error: %r", err)

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._has_work.wait()
                if not self._queue:  # closing and drained
                    self._idle.notify_all()
                    return
                batch: list[tuple[BlockHash, bytes]] = []
                nbytes = 0
                while self._queue and len(batch) < _BATCH_ITEMS and nbytes < _BATCH_BYTES:
                    item = self._queue.popleft()
                    batch.append(item)
                    nbytes += len(item[1])
                self._queued_bytes -= nbytes
                self._in_flight = len(batch)
            try:
                self._write_batch(batch, nbytes)
            finally:
                with self._lock:
                    self._in_flight = 0
                    if not self._queue:
                        self._idle.notify_all()

    def _write_batch(self, batch: list[tuple[BlockHash, bytes]], nbytes: int) -> None:
        if not self.breaker.allow():
            self._count(writes_dropped=len(batch))
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for block_hash, payload in batch:
                pipe.set(self._key(block_hash), payload, ex=self._ttl)
            pipe.execute()
        except Exception as err:
            self._failed(err)
            self._count(writes_dropped=len(batch))
            return
        self.breaker.success()
        self._count(writes=len(batch), bytes_written=nbytes)
