"""One open .safetensors file: its header parsed and validated, tensor bytes read by `pread`.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON mapping tensor names to {dtype, shape, data_offsets}, plus an optional
`__metadata__` string map; then the data section, which offsets are relative to.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zayaserve.replicas.model.checkpoint_errors import CheckpointError, CorruptCheckpointError

# A header larger than this is not a real checkpoint; refuse before allocating for it.
_MAX_HEADER_BYTES = 256 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie, and how to view them."""

    file: SafetensorsFile
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


class SafetensorsFile:
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

    def _parse_header(self) -> tuple[dict[str, str], dict[str, TensorEntry]]:
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

    def _parse_entry(self, name: str, info: Any, data_start: int, data_size: int) -> TensorEntry:
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
        return TensorEntry(self, dtype, tuple(shape), data_start + begin, end - begin)

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
