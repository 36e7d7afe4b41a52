"""Dense tensors <-> the `zayaserve.expert.v1.Tensor` message.

Wire format: `dtype` is the torch dtype name ("float32", "bfloat16", "float16", "int64"),
`shape` the sizes, `data` the elements as raw little-endian bytes in C order. bf16 travels as its
raw 16-bit patterns, so nothing is rounded on the way.

Decoding is zero-copy over the message's bytes: the returned tensor aliases a bytes object that
protobuf handed out, so callers read it (index, matmul, copy out) and never write into it in place
(`decode(..., copy=True)` gives a writable tensor).
"""

from __future__ import annotations

import math
import sys
import warnings

import torch

from zayaserve.router.protos import expert_pb2

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
}
_NAME_OF = {dtype: name for name, dtype in WIRE_DTYPES.items()}

# Both ends raise gRPC's 4 MiB default: one layer's rows for a shard is [n, H] activations, e.g.
# 8192 prefill tokens x 2048 x bf16 = 32 MiB, and a server must accept what a client may send.
MAX_MESSAGE_BYTES = 256 * 1024**2

# The wire is little-endian and data is copied as the host lays it out.
if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in the fleet
    raise ImportError("zayaserve.router.tensor_codec assumes a little-endian host")

# torch.frombuffer warns once per process that a bytes object is not writable. The aliasing is
# intended (see the module docstring), so spend that one warning here, silenced, not in a log.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(bytes(4), dtype=torch.float32)


class TensorCodecError(ValueError):
    """A tensor that cannot be put on, or taken off, the wire; the message names the field."""


def encode(t: torch.Tensor, field: str = "tensor") -> expert_pb2.Tensor:
    """One copy out of the tensor into the message (protobuf copies once more when serialising)."""
    name = _NAME_OF.get(t.dtype)
    if name is None:
        raise TensorCodecError(
            f"{field}: dtype {t.dtype} cannot be sent; use one of {sorted(WIRE_DTYPES)}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    # A uint8 view of a 1-D contiguous tensor reinterprets its bytes (bf16 included) for free.
    raw = flat.view(torch.uint8).numpy().tobytes()
    return expert_pb2.Tensor(dtype=name, shape=list(t.shape), data=raw)


def decode(
    msg: expert_pb2.Tensor,
    field: str = "tensor",
    *,
    expect_dtype: torch.dtype | None = None,
    expect_ndim: int | None = None,
    copy: bool = False,
) -> torch.Tensor:
    """The tensor a message carries, checked against its declared dtype and shape."""
    dtype = WIRE_DTYPES.get(msg.dtype)
    if dtype is None:
        raise TensorCodecError(
            f"{field}.dtype: unknown dtype {msg.dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    if expect_dtype is not None and dtype != expect_dtype:
        raise TensorCodecError(f"{field}.dtype: expected {_NAME_OF[expect_dtype]}, got {msg.dtype}")
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in shape):
        raise TensorCodecError(f"{field}.shape: negative size in {list(shape)}")
    if expect_ndim is not None and len(shape) != expect_ndim:
        raise TensorCodecError(
            f"{field}.shape: expected {expect_ndim} dimensions, got {list(shape)}")
    data = msg.data  # protobuf hands out a fresh bytes object per access: read it once
    itemsize = torch.empty((), dtype=dtype).element_size()
    want = math.prod(shape) * itemsize
    if len(data) != want:
        raise TensorCodecError(
            f"{field}.data: {len(data)} bytes, but shape {list(shape)} of {msg.dtype} needs {want}")
    if want == 0:
        return torch.empty(shape, dtype=dtype)  # frombuffer rejects empty buffers
    out = torch.frombuffer(data, dtype=dtype).view(shape)
    return out.clone() if copy else out


__all__ = ["MAX_MESSAGE_BYTES", "WIRE_DTYPES", "TensorCodecError", "decode", "encode"]


def pinned_host_copy(t: torch.Tensor) -> torch.Tensor:
    """A device tensor in pinned host memory (torch's caching host allocator reuses it): the
    one device-to-host copy before its rows go on the wire."""
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    return host.copy_(t)
