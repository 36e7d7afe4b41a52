"""L2 prefix cache through a real redis-server: a fresh engine (empty L1) resumes from blocks
another engine published, with identical answers; bad, forged, moved and foreign entries and
outages are only misses; cache salts keep prefixes apart."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hf_reference import build_hf_checkpoint
from test_redis_store import RedisServer, needs_redis

from zayaserve import LLM, SamplingParams

pytestmark = [pytest.mark.redis, needs_redis]
SHARED = list(range(20, 61))  # 41 tokens: 10 full blocks of 4 + 1
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
SECRET = "l2-test-secret-0123456789"  # what the cluster hands every worker of a deployment


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("l2")
    build_hf_checkpoint(path, seed=9)
    return path


@pytest.fixture
def redis_server(tmp_path: Path):
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def _llm(ckpt: Path, url: str | None, **kw: Any) -> LLM:
    kw.setdefault("kv_cache_secret", SECRET)
    return LLM(model=str(ckpt), block_size=4, kv_cache_redis_url=url, **kw)


def _run(llm: LLM, prompts: list[list[int]]) -> list[Any]:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS)


def _tokens(outs: list[Any]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _publish(ckpt: Path, url: str, **kw: Any) -> list[Any]:
    writer = _llm(ckpt, url, **kw)
    outs = _run(writer, [SHARED + [7]])
    assert writer.engine.remote is not None and writer.engine.remote.store.flush(10)
    return outs


def test_fresh_process_hits_l2_with_identical_tokens(ckpt: Path, redis_server: RedisServer):
    url = redis_server.url()
    cold = _run(LLM(model=str(ckpt), block_size=4, enable_prefix_caching=False),
                [SHARED + [9, 9]])
    _publish(ckpt, url)
    # A fresh process with an empty L1, as a second replica or a restart would be.
    code = f"""
import json, sys
from zayaserve import LLM, SamplingParams
llm = LLM(model={str(ckpt)!r}, block_size=4, kv_cache_redis_url={url!r},
          kv_cache_secret={SECRET!r})
out = llm.generate([{{"prompt_token_ids": {SHARED + [9, 9]}}}],
                   SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
print(json.dumps({{"tokens": out.outputs[0].token_ids, "cached": out.num_cached_tokens,
                  "stats": llm.stats()}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tokens"] == _tokens(cold)[0]
    assert got["cached"] == 40  # all 10 full blocks of the shared prefix came from Redis
    assert got["stats"]["prefix_cache_remote_hit_tokens"] == 40
    assert got["stats"]["prefix_cache_local_hit_tokens"] == 0


def test_corrupt_truncated_and_foreign_entries_are_rejected(ckpt: Path,
                                                            redis_server: RedisServer):
    url = redis_server.url()
    cold = _tokens(_run(LLM(model=str(ckpt), block_size=4, enable_prefix_caching=False),
                        [SHARED + [3]]))
    _publish(ckpt, url)
    client = redis_server.client()
    keys = sorted(client.keys("zayaserve:kv:*"))
    assert len(keys) >= 10
    for i, key in enumerate(keys):  # damage every entry a different way
        blob = client.get(key)
        assert blob is not None
        if i % 3 == 0:
            blob = blob[:-5]  # truncated
        elif i % 3 == 1:
            blob = blob[:-1] + bytes([blob[-1] ^ 0xFF])  # flipped payload byte
        else:
            blob = b"XX" + blob[2:]  # wrong magic
        client.set(key, blob)
    reader = _llm(ckpt, url)
    outs = _run(reader, [SHARED + [3]])
    assert _tokens(outs) == cold  # the answer never changes
    stats = reader.stats()
    assert stats["prefix_cache_remote_rejected_blocks"] >= 1
    assert stats["prefix_cache_remote_hit_tokens"] == 0 and outs[0].num_cached_tokens == 0


def test_redis_outage_fails_no_request_and_recovery_resumes_hits(
        ckpt: Path, redis_server: RedisServer) -> None:
    url = redis_server.url()
    cold = _tokens(_run(LLM(model=str(ckpt), block_size=4, enable_prefix_caching=False),
                        [SHARED + [5], SHARED[:30] + [6]]))
    llm = _llm(ckpt, url)
    assert _tokens(_run(llm, [SHARED + [5]])) == cold[:1]
    redis_server.stop()  # Redis dies mid-run
    outs = _run(_llm(ckpt, url), [SHARED + [5], SHARED[:30] + [6]])
    assert _tokens(outs) == cold
    redis_server.start()  # back on the same port
    _publish(ckpt, url)
    time.sleep(2.5)  # past the breaker's reset interval
    fresh = _llm(ckpt, url)
    outs = _run(fresh, [SHARED[:30] + [6]])
    assert _tokens(outs) == cold[1:]
    assert fresh.stats()["prefix_cache_remote_hit_tokens"] > 0


@pytest.mark.parametrize("encoding", ["int8", "fp8"])
def test_quantised_encodings_deviation_and_size(ckpt: Path, redis_server: RedisServer,
                                                encoding: str) -> None:
    """Lossy encodings: report the logprob deviation and bytes per token (printed with -s)."""
    url = redis_server.url()
    exact = _run(LLM(model=str(ckpt), block_size=4, enable_prefix_caching=False),
                 [SHARED + [1]])
    writer = _llm(ckpt, url, kv_cache_encoding=encoding)
    _run(writer, [SHARED + [2]])
    assert writer.engine.remote is not None and writer.engine.remote.store.flush(10)
    reader = _llm(ckpt, url, kv_cache_encoding=encoding)
    outs = _run(reader, [SHARED + [1]])
    assert outs[0].num_cached_tokens == 40
    dev = max(abs(a.logprob - b[t].logprob)
              for pa, pb in zip(exact[0].outputs[0].logprobs, outs[0].outputs[0].logprobs,
                                strict=True)
              for t, a in pa.items() if t in pb for b in [pb])
    per_token = writer.engine.remote.block_bytes / 4
    print(f"\n{encoding}: max logprob deviation {dev:.2e}, {per_token:.0f} bytes/token")
    assert dev < 0.5  # a sanity bound; the figure itself is what gets reported


def test_non_finite_kv_with_lossy_encoding_is_kept_local(ckpt: Path,
                                                          redis_server: RedisServer) -> None:
    """A block whose K/V hold NaN/inf cannot be quantised: publishing skips it (counted)
    instead of raising on the engine thread; the engine keeps serving."""

    from zayaserve.replicas.kv_tiers.hashing import BlockHash

    llm = _llm(ckpt, redis_server.url(), kv_cache_encoding="int8")
    want = _tokens(_run(llm, [SHARED + [3]]))
    remote = llm.engine.remote
    assert remote is not None and remote.store.flush(10)
    bs = llm.engine.cache.block_size
    original = llm.engine.cache.k[0][5 * bs].clone()
    llm.engine.cache.k[0][5 * bs] = float("nan")
    writes = remote.store.stats.writes
    remote.publish(5, BlockHash(b"\x01" * 32))
    assert remote.stats.unpublishable_blocks == 1 and remote.store.flush(10)
    assert remote.store.stats.writes == writes
    llm.engine.cache.k[0][5 * bs] = original  # the block is still in L1: heal it
    assert _tokens(_run(llm, [SHARED + [3]])) == want
