"""The tensor wire format: exact round trips, and clear errors naming the field."""

from __future__ import annotations

import pytest
import torch

from zayaserve.router.protos import expert_pb2
from zayaserve.router.tensor_codec import TensorCodecError, decode, encode


def _through_wire(t: torch.Tensor) -> torch.Tensor:
    msg = expert_pb2.Tensor.FromString(encode(t).SerializeToString())
    return decode(msg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("shape", [(5, 64), (0, 64), (0,), (3,), (), (2, 3, 4)])
def test_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.int64:
        t = torch.randint(-(2**40), 2**40, shape, generator=g)
    else:
        t = (torch.randn(shape, generator=g) * 100).to(dtype)
    back = _through_wire(t)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_bf16_and_fp16_keep_every_bit_including_specials() -> None:
    for dtype, view in [(torch.bfloat16, torch.int16), (torch.float16, torch.int16)]:
        t = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 3.14159],
                         dtype=torch.float32).to(dtype)
        back = _through_wire(t)
        assert torch.equal(back.view(view), t.view(view))


def test_non_contiguous_input_is_sent_in_logical_order() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # [4, 3], strided
    assert torch.equal(_through_wire(t), t)
    assert torch.equal(_through_wire(t[::2]), t[::2])


def test_data_is_little_endian_raw_bytes() -> None:
    msg = encode(torch.tensor([1.0], dtype=torch.bfloat16))
    assert msg.dtype == "bfloat16" and list(msg.shape) == [1]
    assert msg.data == (0x3F80).to_bytes(2, "little")


def test_copy_gives_a_writable_independent_tensor() -> None:
    msg = encode(torch.ones(2, 2))
    t = decode(msg, copy=True)
    t += 1
    assert torch.equal(decode(msg), torch.ones(2, 2))


def test_bad_dtype_names_the_field() -> None:
    msg = expert_pb2.Tensor(dtype="float8", shape=[1], data=b"\x00")
    with pytest.raises(TensorCodecError, match=r"hidden\.dtype: unknown dtype 'float8'"):
        decode(msg, "hidden")
    with pytest.raises(TensorCodecError, match=r"hidden\.dtype"):
        decode(expert_pb2.Tensor(dtype="", shape=[0]), "hidden")


def test_size_and_shape_mismatches_are_rejected() -> None:
    with pytest.raises(TensorCodecError, match=r"weights\.data: 6 bytes.*needs 8"):
        decode(expert_pb2.Tensor(dtype="float32", shape=[2], data=bytes(6)), "weights")
    with pytest.raises(TensorCodecError, match=r"x\.shape: negative"):
        decode(expert_pb2.Tensor(dtype="float32", shape=[-1], data=b""), "x")
    msg = encode(torch.zeros(2, 3))
    with pytest.raises(TensorCodecError, match=r"out\.shape: expected 1 dimensions"):
        decode(msg, "out", expect_ndim=1)
    with pytest.raises(TensorCodecError, match=r"out\.dtype: expected bfloat16, got float32"):
        decode(msg, "out", expect_dtype=torch.bfloat16)


def test_unsupported_dtypes_cannot_be_encoded() -> None:
    for t in (torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.bool)):
        with pytest.raises(TensorCodecError, match="hidden: dtype"):
            encode(t, "hidden")
