"""L2 glue: publishes sealed blocks (K/V of every layer plus the CCA states at the block's end)
to the Redis store and installs fetched ones into the engine's paged cache.

Writes are fire-and-forget (the store queues them and drops under pressure); reads are one
pipelined round trip, taken only when the transfer is estimated to beat recomputing the tokens.
Every entry is tagged with an HMAC under the deployment's cache secret and names the block
hash it was published under: a corrupt, stale, forged, moved or non-finite entry decodes to
None, is counted, and is treated as a miss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opentelemetry.trace import SpanKind

from zayaserve.replicas.kv_tiers.hashing import BlockHash
from zayaserve.replicas.kv_tiers.payload import (
    BlockPayload,
    block_nbytes,
    decode_block,
    encode_block,
)
from zayaserve.replicas.kv_tiers.redis_store import RedisBlockStore
from zayaserve.replicas.model.config import ZayaConfig
from zayaserve.replicas.model.kv_cache import KVCache
from zayaserve.replicas.observability import attributes as attr
from zayaserve.replicas.observability import tracing

ENCODINGS = ("none", "int8", "fp8")
SECRET_ENV = "ZAYASERVE_KV_CACHE_SECRET"
log = logging.getLogger("zayaserve.kv_cache")


def cache_secret(configured: str | None) -> bytes:
    """The L2 entries' HMAC key: the configured secret, else $ZAYASERVE_KV_CACHE_SECRET, else a
    fresh random one (said once in the log: entries then die with this deployment). The cluster
    generates one per deployment and passes it to every worker, so they share entries."""
    value = configured or os.environ.get(SECRET_ENV)
    if value:
        if len(value) < 16:
            raise ValueError(f"kv_cache_secret: must be at least 16 characters ({SECRET_ENV})")
        return value.encode()
    log.warning("no kv_cache_secret (or %s) given: generated one, so L2 prefix-cache entries "
                "are readable only by this process and will not survive a restart", SECRET_ENV)
    return secrets.token_bytes(32)


@dataclass
class RemoteTierStats:
    hit_tokens: int = 0
    rejected_blocks: int = 0
    skipped_by_cost: int = 0
    unpublishable_blocks: int = 0  # NaN/inf K/V that a lossy encoding cannot carry


class RemoteTier:
    def __init__(self, store: RedisBlockStore, cache: KVCache, config: ZayaConfig,
                 fingerprint: str, secret: bytes, encoding: str = "none",
                 recompute_tokens_per_s: float = 2000.0) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"kv_cache_encoding: must be one of {ENCODINGS}, got {encoding!r}")
        assert cache.conv_snap is not None, "the L2 tier needs prefix caching's snapshots"
        self.store, self.cache, self.config = store, cache, config
        if len(secret) < 16:
            raise ValueError("kv_cache_secret: must be at least 16 bytes")
        self.fingerprint, self.encoding, self._secret = fingerprint, encoding, secret
        self.recompute_tokens_per_s = recompute_tokens_per_s
        self.stats = RemoteTierStats()
        dtype = cache.k[0].dtype
        self._shape = dict(
            fingerprint=fingerprint, num_layers=config.num_hidden_layers,
            block_size=cache.block_size, num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim, conv_shape=(config.conv_state_len, config.conv_channels),
            v_state_size=config.v_state_size, dtype=dtype)
        self.block_bytes = block_nbytes(**self._shape, encoding=encoding)  # type: ignore[arg-type]

    def _span(self, block: int) -> slice:
        bs = self.cache.block_size
        return slice(block * bs, (block + 1) * bs)

    def publish(self, block: int, block_hash: BlockHash, parent: Any = None) -> None:
        """Encodes the block and queues its write; `parent` (a sampled span context, or None)
        gets a `kv_cache.l2_publish` span."""
        with traced_l2("kv_cache.l2_publish", parent, 1):
            self._publish(block, block_hash)

    def _publish(self, block: int, block_hash: BlockHash) -> None:
        c, span = self.cache, self._span(block)
        assert c.conv_snap is not None and c.v_snap is not None
        k, v = torch.stack([k[span] for k in c.k]), torch.stack([v[span] for v in c.v])
        if self.encoding != "none" and not (k.isfinite().all() and v.isfinite().all()):
            self.stats.unpublishable_blocks += 1  # the block stays local; never fail a step
            return
        payload = encode_block(k, v, c.conv_snap[:, block], c.v_snap[:, block],
                               fingerprint=self.fingerprint, encoding=self.encoding,
                               block_hash=block_hash, secret=self._secret)
        self.store.put_async(block_hash, payload)

    def fetch(self, hashes: list[BlockHash], parent: Any = None) -> list[BlockPayload]:
        """Payloads of the longest prefix of `hashes` found (and valid) in L2; `parent` (a
        sampled span context, or None) gets a `kv_cache.l2_fetch` span."""
        with traced_l2("kv_cache.l2_fetch", parent, len(hashes)) as span:
            found = self._fetch(hashes)
            if span is not None:
                span.set_attribute("zayaserve.kv.blocks_found", len(found))
            return found

    def _fetch(self, hashes: list[BlockHash]) -> list[BlockPayload]:
        if not hashes or not self.store.available:
            return []
        tokens = len(hashes) * self.cache.block_size
        if not self.store.transfer.should_fetch(tokens, len(hashes) * self.block_bytes,
                                                self.recompute_tokens_per_s):
            self.stats.skipped_by_cost += 1
            return []
        found = []
        for block_hash, data in zip(hashes, self.store.get_many(hashes), strict=False):
            if data is None:
                break
            payload = decode_block(data, block_hash=block_hash, secret=self._secret,
                                   encoding=self.encoding, device=self.cache.k[0].device,
                                   **self._shape)  # type: ignore[arg-type]
            if payload is None:
                self.stats.rejected_blocks += 1
                break
            found.append(payload)
        return found

    def install(self, block: int, payload: BlockPayload) -> None:
        c, span = self.cache, self._span(block)
        assert c.conv_snap is not None and c.v_snap is not None
        for layer, (k, v) in enumerate(zip(c.k, c.v, strict=True)):
            k[span] = payload.k[layer]
            v[span] = payload.v[layer]
        c.conv_snap[:, block] = payload.conv_state
        c.v_snap[:, block] = payload.v_state


@contextlib.contextmanager
def traced_l2(name: str, parent: Any, blocks: int) -> Iterator[Any]:
    """A CLIENT span around an L2 call made for a traced request (nothing otherwise)."""
    tracer = tracing.tracer()
    if tracer is None or parent is None:
        yield None
        return
    with tracer.start_as_current_span(
            name, context=tracing.parent_context(parent), kind=SpanKind.CLIENT,
            attributes={"db.system.name": "redis", attr.BLOCKS: blocks}) as span:
        yield span

