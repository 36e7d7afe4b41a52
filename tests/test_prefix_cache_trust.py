"""Whoever can write to Redis cannot change an answer: against a real redis-server, valid
entries moved under another prefix's keys, entries with a forged tag, entries of another
deployment's secret and validly tagged entries holding NaN are each rejected (counted under
their reason) and the answer is the cold run's. Salts: two salts never share a block, one salt
does (in L1 and in L2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_prefix_cache_redis import SECRET, SHARED, _llm, _publish, _run, _tokens
from test_prefix_cache_redis import ckpt as ckpt  # noqa: F401 (fixture)
from test_prefix_cache_redis import redis_server as redis_server  # noqa: F401 (fixture)
from test_redis_store import RedisServer, needs_redis

from zayaserve import LLM, SamplingParams
from zayaserve.replicas.kv_tiers import payload
from zayaserve.replicas.kv_tiers.payload import TAG_LEN, encode_block

pytestmark = [pytest.mark.redis, needs_redis]
OTHER = list(range(100, 141))  # another user's prefix: 10 full blocks of 4 + 1


def _cold(ckpt: Path, prompt: list[int]) -> list[list[int]]:
    return _tokens(_run(LLM(model=str(ckpt), block_size=4, enable_prefix_caching=False),
                        [prompt]))


def _keys(llm: LLM, prompt: list[int]) -> list[bytes]:
    store = llm.engine.remote.store  # type: ignore[union-attr]
    seq_hashes = _hashes(llm, prompt)
    return [store._key(h) for h in seq_hashes]


def _hashes(llm: LLM, prompt: list[int]) -> list[Any]:
    from zayaserve.replicas.kv_tiers.hashing import block_hashes

    return block_hashes(prompt, 4, llm.engine.cache_namespace)


def _read(ckpt: Path, url: str, prompt: list[int], **kw: Any) -> tuple[list[list[int]], dict,
                                                                      dict[str, int]]:
    before = payload.rejects.copy()
    reader = _llm(ckpt, url, **kw)
    outs = _run(reader, [prompt])
    return _tokens(outs), reader.stats(), dict(payload.rejects - before)


def test_moved_forged_foreign_and_nan_entries_change_no_answer(
        ckpt: Path, redis_server: RedisServer) -> None:  # noqa: F811
    url = redis_server.url()
    prompt = SHARED + [3]
    cold = _cold(ckpt, prompt)
    _publish(ckpt, url)  # the victim's prefix, published by a worker of this deployment
    writer = _llm(ckpt, url)
    _run(writer, [OTHER + [5]])  # another prefix: valid entries of this deployment
    assert writer.engine.remote is not None and writer.engine.remote.store.flush(10)
    client = redis_server.client()
    victim, other = _keys(writer, SHARED), _keys(writer, OTHER)
    originals = [client.get(k) for k in victim]
    assert all(originals) and all(client.get(k) for k in other)

    def attack(blobs: list[bytes]) -> tuple[list[list[int]], dict, dict[str, int]]:
        for key, blob in zip(victim, blobs, strict=True):
            client.set(key, blob)
        return _read(ckpt, url, prompt)

    # 1. Valid blobs copied under the victim's keys (the attack of the last review).
    tokens, stats, reasons = attack([client.get(k) for k in other])
    assert tokens == cold and reasons == {"block_hash": 1}
    assert stats["prefix_cache_remote_rejected_blocks"] == 1
    assert stats["prefix_cache_remote_hit_tokens"] == 0
    # 2. A forged tag (the body edited, the tag guessed).
    forged = [b[:40] + bytes([b[40] ^ 1]) + b[41:-TAG_LEN] + bytes(TAG_LEN) for b in originals]
    tokens, stats, reasons = attack(forged)
    assert tokens == cold and reasons == {"tag": 1}
    assert stats["prefix_cache_remote_rejected_blocks"] == 1
    # 3. The victim's own entries, read by a deployment with another secret.
    for key, blob in zip(victim, originals, strict=True):
        client.set(key, blob)
    tokens, stats, reasons = _read(ckpt, url, prompt, kv_cache_secret="x" * 24)
    assert tokens == cold and reasons == {"tag": 1}
    assert stats["prefix_cache_remote_hit_tokens"] == 0
    # 4. Validly tagged (a secret holder gone wrong) but holding NaN.
    eng = writer.engine
    L, nkv, d = eng.model_config.num_hidden_layers, eng.model_config.num_key_value_heads, \
        eng.model_config.head_dim
    conv = (eng.model_config.conv_state_len, eng.model_config.conv_channels)
    k = torch.zeros(L, 4, nkv, d)
    k[0, 0, 0, 0] = float("nan")
    nan_blob = encode_block(k, torch.zeros_like(k), torch.zeros(L, *conv),
                            torch.zeros(L, eng.model_config.v_state_size),
                            fingerprint=eng.fingerprint, encoding="none",
                            block_hash=_hashes(writer, SHARED)[0], secret=SECRET.encode())
    tokens, stats, reasons = attack([nan_blob] + originals[1:])
    assert tokens == cold and reasons == {"nonfinite": 1}
    # The untouched entries still serve: the honest path works after all of it.
    for key, blob in zip(victim, originals, strict=True):
        client.set(key, blob)
    tokens, stats, reasons = _read(ckpt, url, prompt)
    assert tokens == cold and not reasons and stats["prefix_cache_remote_hit_tokens"] == 40


def test_two_salts_never_share_a_block_one_salt_does(
        ckpt: Path, redis_server: RedisServer) -> None:  # noqa: F811
    url = redis_server.url()
    prompt = SHARED + [3]
    cold = _cold(ckpt, prompt)

    def params(salt: str | None) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, cache_salt=salt)

    writer = _llm(ckpt, url)
    first = writer.generate([{"prompt_token_ids": prompt}], params("tenant-a"))[0]
    assert first.num_cached_tokens == 0 and writer.engine.remote is not None
    assert writer.engine.remote.store.flush(10)
    # In one engine (L1): another salt or none misses, the same salt hits.
    for salt, cached in (("tenant-b", 0), (None, 0), ("tenant-a", 40)):
        out = writer.generate([{"prompt_token_ids": prompt}], params(salt))[0]
        assert out.num_cached_tokens == cached, salt
        assert [out.outputs[0].token_ids] == cold
    # In a fresh engine (L2 only): a salt nobody used misses, the same salt hits.
    for salt, cached in (("tenant-c", 0), ("tenant-a", 40)):
        reader = _llm(ckpt, url)
        out = reader.generate([{"prompt_token_ids": prompt}], params(salt))[0]
        assert out.num_cached_tokens == cached and [out.outputs[0].token_ids] == cold, salt
