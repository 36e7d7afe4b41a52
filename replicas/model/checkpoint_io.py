"""A safetensors reader that reads only the bytes of the tensors asked for.

The attention side of a replica never needs expert weights and an expert shard needs only its
own experts, so we parse the safetensors header ourselves and fetch tensor bytes with
`os.preadv` on a plain file descriptor. Nothing is memory-mapped: every returned tensor owns
a private, writable buffer, so callers may modify it or move it to a device freely.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON mapping tensor names to {dtype, shape, data_offsets}, plus an optional
`__metadata__` string map; then the data section, which offsets are relative to.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# A header larger than this is not a real checkpoint; refuse before allocating for it.
_MAX_HEADER_BYTES = 256 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read as asked; the message names the file and tensor."""


class MissingTensorError(CheckpointError):
    """The requested tensor is not in the checkpoint."""


class TensorShapeError(CheckpointError):
    """A tensor's stored shape differs from what the caller expects, or rows are out of range."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file or index is malformed or truncated."""


@dataclass(frozen=True)
class _Entry:
    file: _SafetensorsFile
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


class _SafetensorsFile:
    """One open .safetensors file with a validated header."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot open ({err.strerror})") from None
        try:
            self.metadata, self.entries = self._parse_header()
        except BaseException:
            self.close()
            raise

    def _corrupt(self, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path}: {why}")

    def _parse_header(self) -> tuple[dict[str, str], dict[str, _Entry]]:
        assert self.fd is not None
        size = os.fstat(self.fd).st_size
        prefix = os.pread(self.fd, 8, 0)
        if len(prefix) < 8:
            raise self._corrupt(f"file is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise self._corrupt(f"header length {header_len} runs past the end of the file "
                                f"({size} bytes)")
        raw = os.pread(self.fd, header_len, 8)
        if len(raw) != header_len:
            raise self._corrupt("file shrank while reading the header")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._corrupt(f"header is not valid JSON ({err})") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")

        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise self._corrupt("__metadata__ is not a JSON object")
        data_start = 8 + header_len
        data_size = size - data_start
        entries = {name: self._parse_entry(name, info, data_start, data_size)
                   for name, info in header.items()}

        # Overlapping tensors would alias each other's bytes; a sane writer never produces them.
        spans = sorted((e.start, e.start + e.nbytes, n) for n, e in entries.items() if e.nbytes)
        for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:], strict=False):
            if start < prev_end:
                raise self._corrupt(f"tensors {prev!r} and {name!r} have overlapping data")
        return {str(k): str(v) for k, v in metadata.items()}, entries

    def _parse_entry(self, name: str, info: Any, data_start: int, data_size: int) -> _Entry:
        if not isinstance(info, dict):
            raise self._corrupt(f"tensor {name!r}: header entry is not an object")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype_name not in _DTYPES:
            raise self._corrupt(f"tensor {name!r}: unknown dtype {dtype_name!r}")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise self._corrupt(f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise self._corrupt(f"tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise self._corrupt(f"tensor {name!r}: data_offsets {offsets} are not increasing")
        if end > data_size:
            raise self._corrupt(f"tensor {name!r}: data ends at {end} but the data section has "
                                f"only {data_size} bytes (truncated file?)")
        dtype = _DTYPES[dtype_name]
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want:
            raise self._corrupt(f"tensor {name!r}: {end - begin} bytes stored, but "
                                f"{dtype_name}{shape} needs {want}")
        return _Entry(self, dtype, tuple(shape), data_start + begin, end - begin)

    def pread_into(self, buf: memoryview, offset: int) -> int:
        """Fill `buf` from `offset`; preadv may stop short (2 GiB cap, signals), so loop."""
        if self.fd is None:
            raise CheckpointError(f"{self.path}: reader is closed")
        done = 0
        while done < len(buf):
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got == 0:
                raise self._corrupt(f"unexpected end of file at byte {offset + done}")
            done += got
        return done

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class CheckpointReader:
    """Random access to the tensors of a safetensors checkpoint (one file or an index of shards).

    `path` is a checkpoint folder (holding `model.safetensors.index.json` or `model.safetensors`),
    a single `.safetensors` file, or an index json file.
    """

    def __init__(self, path: str | Path) -> None:
        if sys.byteorder != "little":  # safetensors data is little-endian; we do not byte-swap
            raise CheckpointError("CheckpointReader needs a little-endian host")
        self.path = Path(path)
        self.bytes_read = 0  # tensor-data bytes fetched so far (headers excluded)
        self._lock = threading.Lock()
        self._files: list[_SafetensorsFile] = []
        self._entries: dict[str, _Entry] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        path = self.path
        if path.is_dir():
            if (path / INDEX_FILE).is_file():
                self._open_index(path / INDEX_FILE)
            elif (path / SINGLE_FILE).is_file():
                self._open_single(path / SINGLE_FILE)
            else:
                raise CheckpointError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE} in the folder")
        elif path.name.endswith(".index.json"):
            self._open_index(path)
        elif path.is_file():
            self._open_single(path)
        else:
            raise CheckpointError(f"{path}: no such checkpoint file or folder")

    def _open_single(self, file: Path) -> None:
        shard = _SafetensorsFile(file)
        self._files.append(shard)
        self._entries.update(shard.entries)

    def _open_index(self, index: Path) -> None:
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptCheckpointError(f"{index}: cannot read index ({err})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise CorruptCheckpointError(f"{index}: no weight_map of tensor name -> file name")
        shards: dict[str, _SafetensorsFile] = {}
        for file_name in sorted(set(weight_map.values())):
            if Path(file_name).name != file_name:
                raise CorruptCheckpointError(f"{index}: shard name {file_name!r} is not a plain "
                                             "file name")
            shard = _SafetensorsFile(index.parent / file_name)
            shards[file_name] = shard
            self._files.append(shard)
        for name, file_name in weight_map.items():
            entry = shards[file_name].entries.get(name)
            if entry is None:
                raise CorruptCheckpointError(
                    f"{index}: weight_map puts {name!r} in {file_name}, which lacks it")
            self._entries[name] = entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    @property
    def metadata(self) -> dict[str, str]:
        """`__metadata__` of the first file (all shards of one save carry the same)."""
        return dict(self._files[0].metadata) if self._files else {}

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise MissingTensorError(f"tensor {name!r} not found in {self.path}")
        return entry

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        return self._entry(name).nbytes

    def _checked(self, name: str, expect_shape: Sequence[int] | None) -> _Entry:
        entry = self._entry(name)
        if expect_shape is not None and tuple(expect_shape) != entry.shape:
            raise TensorShapeError(f"tensor {name!r} in {entry.file.path}: expected shape "
                                   f"{tuple(expect_shape)}, found {entry.shape}")
        return entry

    def _fetch(self, entry: _Entry, buf: memoryview, offset: int) -> None:
        got = entry.file.pread_into(buf, offset)
        with self._lock:
            self.bytes_read += got

    @staticmethod
    def _as_tensor(buf: bytearray, dtype: torch.dtype, shape: Sequence[int],
                   out_dtype: torch.dtype | None) -> torch.Tensor:
        if len(buf) == 0:
            tensor = torch.empty(tuple(shape), dtype=dtype)
        else:
            # frombuffer over a private bytearray: writable, no copy, no file mapping.
            tensor = torch.frombuffer(buf, dtype=dtype).reshape(tuple(shape))
        if out_dtype is not None and out_dtype != dtype:
            tensor = tensor.to(out_dtype)
        return tensor

    def read(self, name: str, *, expect_shape: Sequence[int] | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor, converted to `dtype` when given."""
        entry = self._checked(name, expect_shape)
        buf = bytearray(entry.nbytes)
        if entry.nbytes:
            self._fetch(entry, memoryview(buf), entry.start)
        return self._as_tensor(buf, entry.dtype, entry.shape, dtype)

    def read_rows(self, name: str, rows: Sequence[int], *,
                  expect_shape: Sequence[int] | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """`tensor[rows]` along dim 0, reading only those rows (one pread per contiguous run).

        `expect_shape` is the full stored tensor's shape.
        """
        entry = self._checked(name, expect_shape)
        if not entry.shape:
            raise TensorShapeError(f"tensor {name!r} in {entry.file.path} is a scalar; "
                                   "it has no rows")
        n_rows = entry.shape[0]
        rows = [int(r) for r in rows]
        bad = [r for r in rows if not 0 <= r < n_rows]
        if bad:
            raise TensorShapeError(f"tensor {name!r} in {entry.file.path}: rows {bad} out of "
                                   f"range for shape {entry.shape}")
        row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        buf = bytearray(len(rows) * row_bytes)
        view = memoryview(buf)
        i = 0
        while i < len(rows) and row_bytes:
            # Extend the run while the requested rows are consecutive in the file.
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            self._fetch(entry, view[i * row_bytes:j * row_bytes],
                        entry.start + rows[i] * row_bytes)
            i = j
        return self._as_tensor(buf, entry.dtype, (len(rows), *entry.shape[1:]), dtype)

    def close(self) -> None:
        for file in self._files:
            file.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # Readers are long-lived, but a forgotten one should not leak descriptors.
        for file in getattr(self, "_files", ()):
            file.close()
