"""The dispatch stream's messages: one layer's rows for a shard, and its answer, as raw bytes
behind a small fixed header (no protobuf, one copy of each tensor into the message).

Request:  header `<QiiqiBB2x` (call id, layer, rows n, placement version, hidden size H,
          hidden dtype, weights dtype), then hidden [n, H], expert ids [n] int64, weights [n].
Response: header `<QiiiB3xI` (call id, status, rows n, hidden size H, dtype, details length),
          then the details (UTF-8), then out [n, H] when the status is OK (0).

Status codes are gRPC's numbers: a refused call (a stale map's FAILED_PRECONDITION, a malformed
request's INVALID_ARGUMENT, a compute error's INTERNAL) is answered in-band, and the stream
stays open. Everything is little-endian, as the tensors' bytes are.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import grpc
import torch

_REQUEST = struct.Struct("<QiiqiBB2x")
_RESPONSE = struct.Struct("<QiiiB3xI")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CODE_OF = {dtype: i for i, dtype in enumerate(DTYPES)}
STATUS = {code.value[0]: code for code in grpc.StatusCode}


class WireError(ValueError):
    """A message that does not parse; the text names the field."""


class Rows(NamedTuple):
    call_id: int
    layer: int
    hidden: torch.Tensor  # [n, H]
    expert_ids: torch.Tensor  # [n] int64
    weights: torch.Tensor  # [n]
    placement_version: int


class Answer(NamedTuple):
    call_id: int
    status: grpc.StatusCode
    details: str
    out: torch.Tensor | None  # [n, H] when the status is OK


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _dtype_code(t: torch.Tensor, field: str) -> int:
    code = _CODE_OF.get(t.dtype)
    if code is None:
        raise WireError(f"{field}: dtype {t.dtype} cannot be sent")
    return code


def encode_rows(call_id: int, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor, placement_version: int) -> bytes:
    n, size = hidden.shape
    header = _REQUEST.pack(call_id, layer, n, placement_version, size,
                           _dtype_code(hidden, "hidden"), _dtype_code(weights, "weights"))
    return b"".join((header, _raw(hidden), _raw(expert_ids.to(torch.int64)), _raw(weights)))


def _tensor(data: bytes, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
            field: str) -> tuple[torch.Tensor, int]:
    count = 1
    for s in shape:
        count *= s
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if offset + nbytes > len(data):
        raise WireError(f"{field}: {len(data) - offset} bytes left, {nbytes} needed")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype), offset
    t = torch.frombuffer(data, dtype=dtype, count=count, offset=offset).view(shape)
    return t, offset + nbytes


def decode_rows(data: bytes) -> Rows:
    """The request's fields, checked; its tensors alias `data` (read them, never write)."""
    if len(data) < _REQUEST.size:
        raise WireError(f"header: {len(data)} bytes, {_REQUEST.size} needed")
    call_id, layer, n, version, size, hcode, wcode = _REQUEST.unpack_from(data)
    if n < 0 or size <= 0 or hcode >= len(DTYPES) or wcode >= len(DTYPES):
        raise WireError(f"header: rows {n}, hidden size {size}, dtypes {hcode}/{wcode}")
    at = _REQUEST.size
    hidden, at = _tensor(data, at, DTYPES[hcode], (n, size), "hidden")
    ids, at = _tensor(data, at, torch.int64, (n,), "expert_ids")
    weights, at = _tensor(data, at, DTYPES[wcode], (n,), "weights")
    if at != len(data):
        raise WireError(f"message: {len(data) - at} bytes past the weights")
    return Rows(call_id, layer, hidden, ids, weights, version)


def call_id_of(data: bytes) -> int:
    return int(struct.unpack_from("<Q", data)[0]) if len(data) >= 8 else 0


def encode_answer(call_id: int, out: torch.Tensor) -> bytes:
    n, size = out.shape
    return _RESPONSE.pack(call_id, 0, n, size, _dtype_code(out, "out"), 0) + _raw(out)


def encode_refusal(call_id: int, status: grpc.StatusCode, details: str) -> bytes:
    text = details.encode()
    return _RESPONSE.pack(call_id, status.value[0], 0, 0, 0, len(text)) + text


def decode_answer(data: bytes) -> Answer:
    if len(data) < _RESPONSE.size:
        raise WireError(f"header: {len(data)} bytes, {_RESPONSE.size} needed")
    call_id, code, n, size, dcode, text_len = _RESPONSE.unpack_from(data)
    status = STATUS.get(code)
    if status is None or dcode >= len(DTYPES) or n < 0 or size < 0:
        raise WireError(f"header: status {code}, dtype {dcode}, shape [{n}, {size}]")
    at = _RESPONSE.size + text_len
    details = bytes(data[_RESPONSE.size:at]).decode(errors="replace")
    if status is not grpc.StatusCode.OK:
        return Answer(call_id, status, details, None)
    out, at = _tensor(data, at, DTYPES[dcode], (n, size), "out")
    if at != len(data):
        raise WireError(f"message: {len(data) - at} bytes past out")
    return Answer(call_id, status, details, out)
