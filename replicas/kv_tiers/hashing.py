"""Content hashes of prefix blocks, identical in every process and on every machine.

A block's hash names the whole prefix up to its end: h_i = H(h_{i-1} || namespace || tokens_i)
with h_{-1} = H(seed || namespace), so two sequences share block i's hash only when they share
every token before it. Only FULL blocks are hashed: a partial tail block can still grow, and its
K/V and CCA states are not final.

H is SHA-256 rather than xxh3_128. The L2 cache is shared through Redis by every replica (and
possibly by several tenants), and a collision hands one prompt another prompt's K/V and CCA
states, i.e. a wrong answer. xxh3 is fast but not collision resistant against chosen inputs,
and token ids are chosen by clients; SHA-256 is. It costs about 3 us per block on a CPU, well
under 0.1% of the prefill it replaces. Never Python's `hash()`: it is salted per process.

The namespace folds in everything that changes what a block's bytes mean: the model (config and
weights), the block size and the cache encoding, plus an optional per-tenant salt.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NewType

BlockHash = NewType("BlockHash", bytes)

DEFAULT_SEED = b"zayaserve-v1"
HASH_BYTES = 32  # SHA-256 digest size; also the namespace size
_INT32 = (-(2**31), 2**31 - 1)
# Bytes `weights_identity` reads at the start, middle and end of every tensor: enough to tell
# apart two fine-tunes of one architecture (same header, same size), a few MB in all.
_WINDOW_BYTES = 1024


def _sha256(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def _canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def cache_namespace(
    model_fingerprint: str, block_size: int, encoding: str, cache_salt: str | None = None
) -> bytes:
    """32 bytes that make hashes of different models, block sizes, encodings or salts disjoint.

    JSON keeps the fields unambiguous (no "ab"+"c" == "a"+"bc"), and `None` differs from "".
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    fields = {"model": model_fingerprint, "block_size": block_size, "encoding": encoding,
              "salt": cache_salt}
    return _sha256(b"zayaserve-namespace\0", _canonical_json(fields))


def _pack_tokens(token_ids: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(token_ids)}i", *token_ids)
    except struct.error:
        bad = next((t for t in token_ids if not (_INT32[0] <= int(t) <= _INT32[1])), None)
        raise ValueError(f"token ids must be int32, got {bad!r}") from None


@dataclass(slots=True)
class BlockHasher:
    """Hashes a growing token sequence block by block (prefill, then decode-time growth).

    `extend` returns the hashes of the blocks its tokens completed; the tokens of an unfinished
    block wait in `pending` until the block fills.
    """

    namespace: bytes
    block_size: int
    seed: bytes = DEFAULT_SEED
    hashes: list[BlockHash] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    _last: bytes = field(default=b"", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if len(self.namespace) != HASH_BYTES:
            raise ValueError(f"namespace must be {HASH_BYTES} bytes (use cache_namespace)")
        self._last = _sha256(self.seed, self.namespace)

    @property
    def num_tokens(self) -> int:
        return len(self.hashes) * self.block_size + len(self.pending)

    def extend(self, token_ids: Iterable[int]) -> list[BlockHash]:
        self.pending.extend(token_ids)
        bs = self.block_size
        full = len(self.pending) // bs
        new: list[BlockHash] = []
        for i in range(full):
            # Fixed-width fields (32-byte hash, 32-byte namespace) keep the input unambiguous.
            self._last = _sha256(self._last, self.namespace,
                                 _pack_tokens(self.pending[i * bs:(i + 1) * bs]))
            new.append(BlockHash(self._last))
        del self.pending[:full * bs]
        self.hashes.extend(new)
        return new


def block_hashes(
    token_ids: Sequence[int], block_size: int, namespace: bytes, seed: bytes = DEFAULT_SEED
) -> list[BlockHash]:
    """Chained hashes of the full blocks of `token_ids` (len // block_size of them)."""
    return BlockHasher(namespace, block_size, seed).extend(token_ids)


def model_fingerprint(config_json: dict[str, Any], weights_identity: str) -> str:
    """Hex SHA-256 of the canonical config JSON and a weights identity.

    The whole config is hashed: a field that does not change the computation (say
    `transformers_version`) only costs cache misses, whereas a forgotten field that does would
    cost wrong answers.
    """
    return hashlib.sha256(
        _canonical_json(config_json) + b"\0" + weights_identity.encode()).hexdigest()


def weights_identity(checkpoint_dir: str | Path) -> str:
    """Hex SHA-256 over each `*.safetensors` file: name, size, header, and sampled data.

    Fast: a few KB per tensor, not the gigabytes of data. The header pins names, dtypes, shapes
    and offsets; three 1 KiB windows of EVERY tensor tell apart two fine-tunes of one
    architecture, even one that changed only a few tensors (a fine-tune moves nearly every
    value of a tensor it touches). Windows per file would miss such partial fine-tunes. mtimes
    are left out on purpose: copies of one checkpoint on different machines must share a cache.
    """
    folder = Path(checkpoint_dir)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError(f"{path}: not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if 8 + header_len > size:
                raise ValueError(f"{path}: safetensors header runs past the end of the file")
            header = f.read(header_len)
            try:
                tensors = json.loads(header)
                spans = sorted(tuple(t["data_offsets"]) for name, t in tensors.items()
                               if name != "__metadata__")
            except (ValueError, TypeError, KeyError, AttributeError):
                raise ValueError(f"{path}: unreadable safetensors header") from None
            h.update(_canonical_json({"name": path.name, "size": size}))
            h.update(raw_len + header)
            data_start = 8 + header_len
            for begin, end in spans:
                middle = (begin + end) // 2
                for offset in sorted({begin, middle, max(begin, end - _WINDOW_BYTES)}):
                    f.seek(data_start + offset)
                    h.update(f.read(min(_WINDOW_BYTES, end - offset)))
    return h.hexdigest()
