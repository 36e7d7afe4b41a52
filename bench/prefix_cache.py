"""Prefix cache: time to first token for a long shared prefix, cold vs L1 hit vs L2 hit.

A 1024-token shared prefix plus a 32-token suffix on the `small` preset. Cold: prefix caching
off. L1: the same engine after another request warmed the prefix. L2: a fresh engine (empty
L1) reading the blocks another engine published to a real redis-server started here. For each
L2 encoding also the payload bytes per token. All in one process, medians of a few runs.

    python -m zayaserve.bench.prefix_cache [--model small] [--prefix 1024] [--suffix 32]
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("needs redis-server (apt-get install redis-server)")
    port, workdir = _free_port(), tempfile.mkdtemp()
    proc = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no",
                             "--bind", "127.0.0.1"], cwd=workdir, stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        cold_llm = LLM(model=path, enable_prefix_caching=False)
        _ttft(cold_llm, prompt())  # warm-up
        cold = statistics.median(_ttft(cold_llm, prompt()) for _ in range(args.repeats))
        l1_llm = LLM(model=path)
        _ttft(l1_llm, prompt())
        l1 = statistics.median(_ttft(l1_llm, prompt()) for _ in range(args.repeats))
        print(f"prefix {args.prefix} + suffix {args.suffix} tokens, model {args.model}")
        print(f"TTFT cold   {cold * 1e3:8.1f} ms")
        print(f"TTFT L1 hit {l1 * 1e3:8.1f} ms  ({l1 / cold:.2f} x cold)")
        for encoding in ("none", "int8", "fp8"):
            writer = LLM(model=path, kv_cache_redis_url=url, kv_cache_encoding=encoding)
            _ttft(writer, prompt())
            assert writer.engine.remote is not None
            writer.engine.remote.store.flush(30)
            times = []
            for _ in range(args.repeats):  # each a fresh engine: empty L1, L2 only
                reader = LLM(model=path, kv_cache_redis_url=url, kv_cache_encoding=encoding)
                times.append(_ttft(reader, prompt()))
                hits = reader.stats()["prefix_cache_remote_hit_tokens"]
            l2 = statistics.median(times)
            remote = writer.engine.remote
            per_token = remote.block_bytes / writer.engine.config.block_size
            print(f"TTFT L2 hit {l2 * 1e3:8.1f} ms  ({l2 / cold:.2f} x cold)  encoding "
                  f"{encoding:<4} {per_token:9.0f} bytes/token, {hits:.0f} tokens from Redis")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
