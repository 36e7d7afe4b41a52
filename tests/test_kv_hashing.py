"""Prefix block hashes: deterministic across processes, chained, namespaced, full blocks only."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from zayaserve.replicas.kv_tiers.hashing import (
    BlockHasher,
    block_hashes,
    cache_namespace,
    model_fingerprint,
    weights_identity,
)

TOKENS = [random.Random(0).randrange(262_272) for _ in range(100)]
NS = cache_namespace("fp-a", 16, "none")

_CHILD = """
import json, sys
from zayaserve.replicas.kv_tiers.hashing import block_hashes, cache_namespace
tokens = json.loads(sys.argv[1])
ns = cache_namespace("fp-a", 16, "none")
print(json.dumps([[h.hex() for h in block_hashes(tokens, 16, ns)], hash("zayaserve")]))
"""


def test_hashes_are_identical_in_another_process() -> None:
    # The child gets a different str-hash salt than this process (the child proves it by
    # printing hash() of a string), yet must produce the same block hashes.
    seed = "4242" if os.environ.get("PYTHONHASHSEED") != "4242" else "17"
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(TOKENS)], text=True,
                         capture_output=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": seed})
    child_hashes, child_str_hash = json.loads(out.stdout)
    assert child_str_hash != hash("zayaserve")
    assert child_hashes == [h.hex() for h in block_hashes(TOKENS, 16, NS)]


def test_only_full_blocks_are_hashed() -> None:
    hashes = block_hashes(TOKENS, 16, NS)
    assert len(hashes) == len(TOKENS) // 16 == 6
    assert block_hashes(TOKENS[:96], 16, NS) == hashes  # the 4-token tail changes nothing
    assert block_hashes(TOKENS[:15], 16, NS) == []
    assert all(len(h) == 32 for h in hashes) and len(set(hashes)) == len(hashes)


def test_hashes_are_chained() -> None:
    base = block_hashes(TOKENS, 16, NS)
    early = list(TOKENS)
    early[0] += 1
    assert all(a != b for a, b in zip(block_hashes(early, 16, NS), base, strict=True))
    mid = list(TOKENS)
    mid[2 * 16 + 5] += 1  # inside block 2
    changed = block_hashes(mid, 16, NS)
    assert changed[:2] == base[:2]
    assert all(a != b for a, b in zip(changed[2:], base[2:], strict=True))
    # The same block content at a different position is a different prefix.
    repeated = TOKENS[:16] * 2
    first, second = block_hashes(repeated, 16, NS)
    assert first != second


def test_namespace_separates_models_block_sizes_encodings_and_salts() -> None:
    spaces = [
        cache_namespace("fp-a", 16, "none"),
        cache_namespace("fp-b", 16, "none"),
        cache_namespace("fp-a", 32, "none"),
        cache_namespace("fp-a", 16, "int8"),
        cache_namespace("fp-a", 16, "fp8"),
        cache_namespace("fp-a", 16, "none", cache_salt="tenant-1"),
        cache_namespace("fp-a", 16, "none", cache_salt="tenant-2"),
        cache_namespace("fp-a", 16, "none", cache_salt=""),
    ]
    assert len(set(spaces)) == len(spaces)
    assert cache_namespace("fp-a", 16, "none") == spaces[0]  # stable
    firsts = {block_hashes(TOKENS, 16, ns)[0] for ns in spaces}
    assert len(firsts) == len(spaces)
    assert block_hashes(TOKENS, 16, NS, seed=b"other") != block_hashes(TOKENS, 16, NS)


def test_incremental_hasher_matches_one_shot() -> None:
    rng = random.Random(1)
    for _ in range(20):
        hasher = BlockHasher(NS, 16)
        got, i = [], 0
        while i < len(TOKENS):
            step = rng.randrange(1, 40)
            got += hasher.extend(TOKENS[i:i + step])
            i += step
        assert got == hasher.hashes == block_hashes(TOKENS, 16, NS)
        assert hasher.num_tokens == len(TOKENS) and hasher.pending == TOKENS[96:]
    decode = BlockHasher(NS, 4)
    assert decode.extend([1, 2, 3]) == []
    (completed,) = decode.extend([4])  # the decode step that fills a block yields its hash
    assert [completed] == block_hashes([1, 2, 3, 4], 4, NS)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="int32"):
        block_hashes([1, 2**31], 2, NS)
    with pytest.raises(ValueError, match="block_size"):
        cache_namespace("fp", 0, "none")
    with pytest.raises(ValueError, match="namespace"):
        BlockHasher(b"short", 4)


def test_model_fingerprint() -> None:
    cfg = {"model_type": "zaya", "hidden_size": 64, "num_hidden_layers": 2}
    fp = model_fingerprint(cfg, "w1")
    assert fp == model_fingerprint(dict(reversed(list(cfg.items()))), "w1")  # key order
    assert fp != model_fingerprint({**cfg, "hidden_size": 128}, "w1")
    assert fp != model_fingerprint(cfg, "w2")
    assert len(fp) == 64


def test_weights_identity(tmp_path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(256, 64, generator=g), "b": torch.randn(64, generator=g)}
    save_file(tensors, str(a / "model-00001-of-00002.safetensors"))
    save_file({"e": torch.randn(300, 32, generator=g)}, str(a / "model-00002-of-00002.safetensors"))
    (a / "config.json").write_text("{}")
    ident = weights_identity(a)

    time.sleep(0.01)
    copy = tmp_path / "copy"
    shutil.copytree(a, copy, copy_function=shutil.copyfile)  # new mtimes, same bytes
    assert weights_identity(copy) == ident

    # Same names, dtypes, shapes and sizes; only the values of ONE small tensor differ.
    tuned = tmp_path / "tuned"
    shutil.copytree(a, tuned)
    save_file({"w": tensors["w"], "b": tensors["b"] + 0.01},
              str(tuned / "model-00001-of-00002.safetensors"))
    assert weights_identity(tuned) != ident
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(ValueError, match="header"):
        weights_identity(broken)

    with pytest.raises(FileNotFoundError):
        weights_identity(tmp_path / "empty-does-not-exist")
