"""Prefix cache: time to first token for a long shared prefix, cold vs L1 hit vs L2 hit.

A 1024-token shared prefix plus a 32-token suffix on the `small` preset. Cold: prefix caching
off. L1: the same engine after another request warmed the prefix. L2: a fresh engine (empty
L1) reading the blocks another engine published to a real redis-server started here. For each
L2 encoding also the payload bytes per token. All in one process, medians of a few runs.

    python -m zayaserve.bench.prefix_cache [--model small] [--prefix 1024] [--suffix 32]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Sequence

from zayaserve.bench.local_services import RedisServer

SECRET = "prefix-cache-bench"  # the writer's and the readers' (a cluster shares one)


def _close(llm: object) -> None:
    """Stops the engine's Redis writer and frees its memory now (engines hold cycles)."""
    remote = llm.engine.remote  # type: ignore[attr-defined]
    if remote is not None:
        remote.store.close()
    del llm
    gc.collect()


def _ttft(llm: object, prompt: list[int]) -> float:
    from zayaserve import SamplingParams

    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}],  # type: ignore[attr-defined]
                 SamplingParams(temperature=0, max_tokens=1))
    return time.perf_counter() - t


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from zayaserve import LLM
    from zayaserve.replicas.model.checkpoint_paths import resolve_model
    from zayaserve.replicas.model.config import ZayaConfig

    path = str(resolve_model(args.model))
    vocab = ZayaConfig.from_pretrained(path).vocab_size
    rng = random.Random(0)
    prefix = [rng.randrange(4, vocab) for _ in range(args.prefix)]

    def prompt() -> list[int]:
        return prefix + [rng.randrange(4, vocab) for _ in range(args.suffix)]

    # Every engine gets the same KV cache, sized for a few such prompts: 14 engines of the
    # default 2 GB would not fit this machine's memory.
    blocks = {"num_kv_blocks": 4 * -(-(args.prefix + args.suffix + 1) // 16)}
    redis = RedisServer()
    url = redis.url
    try:
        cold_llm = LLM(model=path, enable_prefix_caching=False, **blocks)
        _ttft(cold_llm, prompt())  # warm-up
        cold = statistics.median(_ttft(cold_llm, prompt()) for _ in range(args.repeats))
        l1_llm = LLM(model=path, **blocks)
        _ttft(l1_llm, prompt())
        l1 = statistics.median(_ttft(l1_llm, prompt()) for _ in range(args.repeats))
        del cold_llm, l1_llm
        print(f"prefix {args.prefix} + suffix {args.suffix} tokens, model {args.model}")
        print(f"TTFT cold   {cold * 1e3:8.1f} ms")
        print(f"TTFT L1 hit {l1 * 1e3:8.1f} ms  ({l1 / cold:.2f} x cold)")
        for encoding in ("none", "int8", "fp8"):
            # One secret for all: each engine would otherwise make its own and read nothing.
            shared = {"kv_cache_redis_url": url, "kv_cache_encoding": encoding,
                      "kv_cache_secret": SECRET, **blocks}
            writer = LLM(model=path, **shared)
            _ttft(writer, prompt())
            assert writer.engine.remote is not None
            writer.engine.remote.store.flush(30)
            times = []
            for _ in range(args.repeats):  # each a fresh engine: empty L1, L2 only
                reader = LLM(model=path, **shared)
                times.append(_ttft(reader, prompt()))
                hits = reader.stats()["prefix_cache_remote_hit_tokens"]
                _close(reader)
            if not hits:
                raise SystemExit(f"encoding {encoding}: the fresh engine read nothing from Redis")
            l2 = statistics.median(times)
            remote = writer.engine.remote
            per_token = remote.block_bytes / writer.engine.config.block_size
            print(f"TTFT L2 hit {l2 * 1e3:8.1f} ms  ({l2 / cold:.2f} x cold)  encoding "
                  f"{encoding:<4} {per_token:9.0f} bytes/token, {hits:.0f} tokens from Redis")
            _close(writer)
    finally:
        redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
