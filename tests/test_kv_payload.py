"""Wire format of a cached block: exact round trips, quantisation bounds, size per token, and
every kind of corruption turned into a counted miss instead of a crash or a wrong answer."""

from __future__ import annotations

import struct

import pytest
import torch

from zayaserve.replicas.kv_tiers import payload
from zayaserve.replicas.kv_tiers.payload import (
    BlockPayload,
    block_nbytes,
    decode_block,
    encode_block,
)

FP = "model-fingerprint-0123"
# Small ZAYA-like layout: L, bs, nkv, D; conv K = (2-1)+(2-1), C = (nq+nkv)*D; Dv = nkv*D/2.
L, BS, NKV, D, NQ = 3, 4, 2, 8, 4
CONV = (2, (NQ + NKV) * D)
DV = NKV * D // 2


def make_block(dtype: torch.dtype, seed: int = 0, layers: int = L, bs: int = BS, nkv: int = NKV,
               d: int = D, conv: tuple[int, int] = CONV, dv: int = DV) -> BlockPayload:
    g = torch.Generator().manual_seed(seed)
    # Per-(layer, head) magnitudes over orders of magnitude, like real K/V.
    mag = 10.0 ** torch.randint(-2, 2, (layers, 1, nkv, 1), generator=g).float()
    k = torch.randn(layers, bs, nkv, d, generator=g) * mag
    v = torch.randn(layers, bs, nkv, d, generator=g) * mag
    conv_state = torch.randn(layers, *conv, generator=g)
    v_state = torch.randn(layers, dv, generator=g)
    return BlockPayload(*(t.to(dtype) for t in (k, v, conv_state, v_state)))


def decode(data: bytes, **overrides) -> BlockPayload | None:
    kwargs = dict(fingerprint=FP, num_layers=L, block_size=BS, num_kv_heads=NKV, head_dim=D,
                  conv_shape=CONV, v_state_size=DV, dtype=torch.float32)
    kwargs.update(overrides)
    return decode_block(data, **kwargs)


def rejected_as(reason: str, data: bytes, **overrides) -> bool:
    before = payload.rejects.copy()
    result = decode(data, **overrides)
    delta = payload.rejects - before
    return result is None and dict(delta) == {reason: 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_none_encoding_round_trips_bit_exactly(dtype: torch.dtype) -> None:
    block = make_block(dtype)
    data = encode_block(*block, fingerprint=FP, encoding="none")
    for buf in (data, bytearray(data), memoryview(data)):
        out = decode(buf, dtype=dtype, encoding="none")
        assert out is not None
        for got, want in zip(out, block, strict=True):
            assert got.dtype == dtype and got.shape == want.shape
            int_view = {4: torch.int32, 2: torch.int16}[want.element_size()]
            assert torch.equal(got.view(int_view), want.view(int_view))


@pytest.mark.parametrize("encoding", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantised_encodings_stay_within_bounds(encoding: str, dtype: torch.dtype) -> None:
    block = make_block(dtype, seed=1)
    out = decode(encode_block(*block, fingerprint=FP, encoding=encoding), dtype=dtype)
    assert out is not None
    # CCA states are never quantised.
    assert torch.equal(out.conv_state, block.conv_state) and torch.equal(out.v_state, block.v_state)
    # Bounds per (layer, head) slice, scale = amax / QMAX: int8 rounds to half a step; e4m3fn
    # keeps 3 mantissa bits (relative half-ulp 2**-4) down to its subnormal step 2**-9 * scale.
    # A bf16 cache adds its own rounding of the result (2**-8 relative).
    out_rounding = 2.0**-8 if dtype == torch.bfloat16 else 1e-6
    for got, want in ((out.k, block.k), (out.v, block.v)):
        x, x_hat = want.float(), got.float()
        amax = x.abs().amax(dim=(1, 3), keepdim=True)
        if encoding == "int8":
            bound = amax / 127 * 0.5 + x.abs() * out_rounding
        else:
            bound = x.abs() * 2.0**-4 + amax / 448 * 2.0**-10 + x.abs() * out_rounding
        assert ((x_hat - x).abs() <= bound * 1.001 + 1e-12).all()
        rel = ((x_hat - x).norm() / x.norm()).item()
        assert rel < (0.01 if encoding == "int8" else 0.05), rel


def test_bytes_per_token_per_encoding(capsys: pytest.CaptureFixture[str]) -> None:
    """Sizes at ZAYA1-8B's real shapes (40 layers, 2 KV heads x 128, conv 2 x 1280, Dv 128)."""
    shapes = dict(layers=40, nkv=2, d=128, conv=(2, 1280), dv=128)
    lines = []
    for dtype in (torch.bfloat16, torch.float32):
        for bs in (16, 64):
            block = make_block(dtype, bs=bs, **shapes)
            elem = block.k.element_size()
            state_bytes = (block.conv_state.numel() + block.v_state.numel()) * elem
            sizes = {}
            for encoding in ("none", "int8", "fp8"):
                data = encode_block(*block, fingerprint=FP, encoding=encoding)
                assert len(data) == block_nbytes(
                    fingerprint=FP, num_layers=40, block_size=bs, num_kv_heads=2, head_dim=128,
                    conv_shape=(2, 1280), v_state_size=128, dtype=dtype, encoding=encoding)
                sizes[encoding] = len(data)
            lines.append(
                f"{str(dtype).removeprefix('torch.'):>9} bs={bs:<3} bytes/token: "
                + "  ".join(f"{enc} {n / bs:>8.0f}" for enc, n in sizes.items())
                + f"  (exact CCA states {state_bytes / bs:.0f} of it)")
            kv_bytes = 2 * 40 * bs * 2 * 128 * elem
            assert sizes["none"] - state_bytes - kv_bytes < 100  # the header is small
            # 1-byte codes + fp32 scales; the exact states are the same in every encoding.
            assert sizes["int8"] == sizes["fp8"] < sizes["none"]
    with capsys.disabled():
        print("\nL2 block payload size (ZAYA1-8B shapes, header included):")
        print("\n".join(lines))


def test_every_single_byte_corruption_is_rejected() -> None:
    for encoding in ("none", "int8"):
        data = encode_block(*make_block(torch.float32), fingerprint=FP, encoding=encoding)
        assert decode(data) is not None
        for i in range(len(data)):
            corrupt = bytearray(data)
            corrupt[i] ^= 0x5A
            assert decode(bytes(corrupt)) is None, f"byte {i} of {len(data)} ({encoding})"


def test_each_mismatch_is_counted_under_its_reason() -> None:
    data = encode_block(*make_block(torch.float32), fingerprint=FP, encoding="int8")
    header_len = 10 + len(FP) + struct.calcsize("<7IBBQQ")
    body = bytearray(data)
    body[header_len + 17] ^= 1
    assert rejected_as("checksum", bytes(body))
    assert rejected_as("truncated", data[:-1])
    assert rejected_as("truncated", data[:header_len])
    assert rejected_as("truncated", data[:5])
    assert rejected_as("truncated", b"")
    assert rejected_as("length", data + b"\0")
    assert rejected_as("magic", b"ZAYAKW" + data[6:])
    assert rejected_as("magic", bytes(range(200)))
    assert rejected_as("version", data[:6] + struct.pack("<H", 2) + data[8:])
    assert rejected_as("fingerprint", data, fingerprint="model-fingerprint-0124")
    assert rejected_as("fingerprint", data, fingerprint="other")
    for field, value in [("num_layers", L + 1), ("block_size", BS * 2), ("num_kv_heads", 1),
                         ("head_dim", D * 2), ("conv_shape", (1, CONV[1])), ("v_state_size", 4)]:
        assert rejected_as("shape", data, **{field: value}), field
    assert rejected_as("dtype", data, dtype=torch.bfloat16)
    assert rejected_as("dtype", data, dtype=torch.int32)
    assert rejected_as("encoding", data, encoding="fp8")
    codes_at = 10 + len(FP) + 7 * 4  # dtype code, then encoding code
    unknown = bytearray(data)
    unknown[codes_at + 1] = 9
    assert rejected_as("encoding", bytes(unknown))
    bad_len = bytearray(data)
    bad_len[codes_at + 2] ^= 1  # body_len
    assert rejected_as("length", bytes(bad_len))
    assert decode(data, encoding="int8") is not None  # the untouched blob still decodes


def test_states_without_conv_history_and_input_validation() -> None:
    block = make_block(torch.float32, conv=(0, CONV[1]))  # cca_time0 = cca_time1 = 1
    out = decode(encode_block(*block, fingerprint=FP, encoding="fp8"), conv_shape=(0, CONV[1]))
    assert out is not None and out.conv_state.shape == (L, 0, CONV[1])
    good = make_block(torch.float32)
    with pytest.raises(ValueError, match="encoding"):
        encode_block(*good, fingerprint=FP, encoding="int4")
    with pytest.raises(ValueError, match="v_state"):
        encode_block(good.k, good.v, good.conv_state, good.v_state[1:], fingerprint=FP,
                     encoding="none")
    with pytest.raises(ValueError, match="dtype"):
        encode_block(good.k, good.v, good.conv_state.half(), good.v_state, fingerprint=FP,
                     encoding="none")
    nan_k = good.k.clone()
    nan_k[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        encode_block(nan_k, good.v, good.conv_state, good.v_state, fingerprint=FP,
                     encoding="int8")
