"""A safetensors reader that reads only the bytes of the tensors asked for.

The attention side of a replica never needs expert weights and an expert shard needs only its
own experts, so we parse the safetensors header ourselves (`safetensors_file`) and fetch tensor
bytes with `os.preadv` on a plain file descriptor. Nothing is memory-mapped: every returned
tensor owns a private, writable buffer, so callers may modify it or move it to a device freely.

A checkpoint is one `.safetensors` file or several shards listed by an index json.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

from zayaserve.replicas.model.checkpoint_errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingTensorError,
    TensorShapeError,
)
from zayaserve.replicas.model.safetensors_file import SafetensorsFile, TensorEntry

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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
        self._files: list[SafetensorsFile] = []
        self._entries: dict[str, TensorEntry] = {}
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
        shard = SafetensorsFile(file)
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
        shards: dict[str, SafetensorsFile] = {}
        for file_name in sorted(set(weight_map.values())):
            if Path(file_name).name != file_name:
                raise CorruptCheckpointError(f"{index}: shard name {file_name!r} is not a plain "
                                             "file name")
            shard = SafetensorsFile(index.parent / file_name)
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

    def _entry(self, name: str) -> TensorEntry:
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

    def _checked(self, name: str, expect_shape: Sequence[int] | None) -> TensorEntry:
        entry = self._entry(name)
        if expect_shape is not None and tuple(expect_shape) != entry.shape:
            raise TensorShapeError(f"tensor {name!r} in {entry.file.path}: expected shape "
                                   f"{tuple(expect_shape)}, found {entry.shape}")
        return entry

    def _fetch(self, entry: TensorEntry, buf: memoryview, offset: int) -> None:
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
