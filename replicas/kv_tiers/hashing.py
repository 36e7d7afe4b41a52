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

The namespace folds in everything that changes what a block's bytes mean: the model (its
config, its weights and NUMERICS_VERSION, the model code's numerics), the block size and the
cache encoding, plus an optional per-tenant salt.

The weights count through `weights_identity`: a SHA-256 of every byte of every safetensors
file, so any change to any value (one row of one tensor) gives a new identity, and copies of
one checkpoint anywhere share one. Reading every byte costs about a second per GB (measured in
bench/RESULTS.md), so each file's digest is remembered in a small JSON file under the cache
root, keyed by the file's path, size, mtime, ctime and inode: an unchanged checkpoint is hashed
once, and an edited or replaced file is hashed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NewType

from zayaserve.replicas.model.checkpoint_paths import cache_root

BlockHash = NewType("BlockHash", bytes)

DEFAULT_SEED = b"zayaserve-v1"
HASH_BYTES = 32  # SHA-256 digest size; also the namespace size
_INT32 = (-(2**31), 2**31 - 1)
# The model code's numerics version, part of every model fingerprint. Bump it with any change to
# kernels or model code that changes the K/V or the CCA states that get cached (a new reduction
# order, a new state layout or dtype...): blocks that older code computed then stop matching.
NUMERICS_VERSION = 1
_CHUNK_BYTES = 16 << 20  # weights_identity reads files in 16 MiB chunks
_MAX_RESULTS = 512  # file digests remembered, least recently used dropped first
# A file changed this recently is hashed but not remembered: a second write within the same
# filesystem clock tick could leave size, mtime and ctime all unchanged (git's "racy clean").
_RACY_NS = 2_000_000_000


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
    """Hex SHA-256 of the canonical config JSON, a weights identity and NUMERICS_VERSION.

    The whole config is hashed: a field that does not change the computation (say
    `transformers_version`) only costs cache misses, whereas a forgotten field that does would
    cost wrong answers. NUMERICS_VERSION is folded in here rather than in `weights_identity`
    so that it also covers models whose weights identity comes from elsewhere (`random:`).
    """
    return hashlib.sha256(
        _canonical_json(config_json) + b"\0" + weights_identity.encode()
        + b"\0numerics=%d" % NUMERICS_VERSION).hexdigest()


def weights_identity(checkpoint_dir: str | Path) -> str:
    """Hex SHA-256 over each `*.safetensors` file's name, size and SHA-256 of ALL its bytes.

    Every byte counts: a fine-tune that changed a single row of one tensor (say `lm_head`) gets
    a new identity. mtimes and paths are left out on purpose: copies of one checkpoint on
    different machines must share a cache. Hashing runs at disk/SHA-256 speed (one thread per
    file), and each file's digest is remembered under the cache root keyed by its path, size,
    mtime, ctime and inode, so an unchanged checkpoint is hashed once, not on every start.
    """
    folder = Path(checkpoint_dir)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    for path in files:
        _check_header(path)
    digests = _file_digests(files)
    listing = [[path.name, path.stat().st_size, digests[path]] for path in files]
    return _sha256(b"zayaserve-weights-v2\0", _canonical_json(listing)).hex()


def _check_header(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if 8 + header_len > size:
            raise ValueError(f"{path}: safetensors header runs past the end of the file")
        try:
            tensors = json.loads(f.read(header_len))
            spans = [t["data_offsets"] for name, t in tensors.items() if name != "__metadata__"]
            if not all(isinstance(s, list) and len(s) == 2 for s in spans):
                raise ValueError("bad data_offsets")
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ValueError(f"{path}: unreadable safetensors header") from None


def _stat_key(path: Path) -> tuple[str, int]:
    """The result cache's key, and the file's mtime. A file edited in place or replaced changes
    size, mtime or ctime (which no tool can set back); one moved or copied, path or inode."""
    resolved = path.resolve()
    st = resolved.stat()
    key = json.dumps([str(resolved), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                      st.st_dev])
    return key, st.st_mtime_ns


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a whole file, read in large chunks into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK_BYTES)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib drops the GIL for large updates
    return h.hexdigest()


def _file_digests(files: Sequence[Path]) -> dict[Path, str]:
    """SHA-256 of each file, from the result cache when its stat key is unchanged."""
    cached = _load_results()
    stats = {path: _stat_key(path) for path in files}
    digests = {path: cached.get(stats[path][0], {}).get("sha256") for path in files}
    todo = [path for path in files if not _is_digest(digests[path])]
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        digests.update(zip(todo, pool.map(file_sha256, todo), strict=True))
    now_ns = time.time_ns()
    updates = {}
    for path in files:
        key, mtime_ns = stats[path]
        if path in todo and (_stat_key(path)[0] != key or now_ns - mtime_ns < _RACY_NS):
            continue  # changed while read, or may still change within its mtime's clock tick
        updates[key] = {"sha256": digests[path], "used": now_ns}
    if updates:
        _save_results(updates)
    return {path: str(digests[path]) for path in files}


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64


def results_file() -> Path:
    """Where weights_identity remembers file digests (JSON, written atomically)."""
    return cache_root() / "weights-sha256.json"


def _load_results() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(results_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict)}


def _last_used(entry: dict[str, Any]) -> int:
    used = entry.get("used")
    return used if isinstance(used, int) else 0


def _save_results(updates: dict[str, dict[str, Any]]) -> None:
    """Merge `updates` into the results file (re-read first: other processes write it too)."""
    entries = {**_load_results(), **updates}
    keep = sorted(entries, key=lambda k: _last_used(entries[k]))[-_MAX_RESULTS:]
    target = results_file()
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=".weights-sha256.",
                                         suffix=".tmp", delete=False, encoding="utf-8") as f:
            tmp = f.name
            json.dump({"entries": {k: entries[k] for k in keep}}, f)
        os.replace(tmp, target)  # readers see the old file or the new one, never half of one
    except OSError:  # a read-only cache root only costs hashing again next time
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def weights_identity_of(model: str, device: Any) -> str:
    """`weights_identity` of a checkpoint folder, or of `random:` weights made on `device`."""
    if model.startswith("random:"):
        from zayaserve.replicas.model.builtin.random_weights import RandomWeights

        return RandomWeights(model, device).identity()
    return weights_identity(Path(model))
