"""Wire format of a cached block: exact round trips, quantisation bounds, size per token, and
every kind of corruption or forgery (a bad tag, another secret, a blob moved to another block's
key, NaN values) turned into a counted miss instead of a crash or a wrong answer."""

from __future__ import annotations

import struct

import pytest
import torch

from zayaserve.replicas.kv_tiers import payload
from zayaserve.replicas.kv_tiers.payload import (
    TAG_LEN,
    BlockPayload,
    _tag,
    block_nbytes,
    decode_block,
)
from zayaserve.replicas.kv_tiers.payload import encode_block as _encode_block

FP = "model-fingerprint-0123"
HASH = bytes(range(32))  # the block hash the blob is published and read under
SECRET = b"cache-secret-0123456789"
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


def encode_block(*tensors: torch.Tensor, **kwargs) -> bytes:
    return _encode_block(*tensors, **{"block_hash": HASH, "secret": SECRET, **kwargs})


def resign(data: bytes) -> bytes:
    """A tampered blob re-tagged with the right secret: what only a secret holder can make."""
    body = data[:-TAG_LEN]
    return body + _tag(SECRET, body)


def decode(data: bytes, **overrides) -> BlockPayload | None:
    kwargs = dict(fingerprint=FP, num_layers=L, block_size=BS, num_kv_heads=NKV, head_dim=D,
                  conv_shape=CONV, v_state_size=DV, dtype=torch.float32, block_hash=HASH,
                  secret=SECRET)
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
            assert sizes["none"] - state_bytes - kv_bytes < 200  # header, block hash, tag
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
    header_len = 10 + len(FP) + 32 + struct.calcsize("<7IBBQ")
    # Without the secret nothing can be changed: any edit, another secret, a cut -> the tag.
    body = bytearray(data)
    body[header_len + 17] ^= 1
    assert rejected_as("tag", bytes(body))
    assert rejected_as("tag", data, secret=b"another-deployment-secret")
    assert rejected_as("tag", data[:-1])
    assert rejected_as("tag", data + b"\0")
    assert rejected_as("tag", b"ZAYAKW" + data[6:])
    assert rejected_as("tag", bytes(range(200)))
    assert rejected_as("truncated", data[:5])
    assert rejected_as("truncated", b"")
    # A valid blob read under another block's key (moved in Redis) is refused.
    assert rejected_as("block_hash", data, block_hash=bytes(32))
    # Validly tagged but unusable here: each reason is its own.
    inner = data[:-TAG_LEN]
    assert rejected_as("truncated", resign(inner[:-1] + bytes(TAG_LEN)))
    assert rejected_as("truncated", resign(inner[:header_len] + bytes(TAG_LEN)))
    assert rejected_as("length", resign(inner + b"\0" + bytes(TAG_LEN)))
    assert rejected_as("magic", resign(b"ZAYAKW" + data[6:]))
    assert rejected_as("version", resign(data[:6] + struct.pack("<H", 1) + data[8:]))
    assert rejected_as("fingerprint", data, fingerprint="model-fingerprint-0124")
    assert rejected_as("fingerprint", data, fingerprint="other")
    for field, value in [("num_layers", L + 1), ("block_size", BS * 2), ("num_kv_heads", 1),
                         ("head_dim", D * 2), ("conv_shape", (1, CONV[1])), ("v_state_size", 4)]:
        assert rejected_as("shape", data, **{field: value}), field
    assert rejected_as("dtype", data, dtype=torch.bfloat16)
    assert rejected_as("dtype", data, dtype=torch.int32)
    assert rejected_as("encoding", data, encoding="fp8")
    codes_at = 10 + len(FP) + 32 + 7 * 4  # dtype code, then encoding code
    unknown = bytearray(data)
    unknown[codes_at + 1] = 9
    assert rejected_as("encoding", resign(bytes(unknown)))
    bad_len = bytearray(data)
    bad_len[codes_at + 2] ^= 1  # body_len
    assert rejected_as("length", resign(bytes(bad_len)))
    assert decode(data, encoding="int8") is not None  # the untouched blob still decodes


@pytest.mark.parametrize("encoding", ["none", "int8", "fp8"])
def test_non_finite_values_are_refused(encoding: str) -> None:
    """Even from a secret holder: NaN in K/V or the states would make greedy emit token 0."""
    block = make_block(torch.float32)
    for i, name in enumerate(("k", "v", "conv_state", "v_state")):
        if encoding != "none" and name in ("k", "v"):
            continue  # the quantisers refuse NaN (tested below); the codes are forged next
        bad = [t.clone() for t in block]
        bad[i].view(-1)[3] = float("nan") if i % 2 else float("inf")
        assert rejected_as("nonfinite", encode_block(*bad, fingerprint=FP, encoding=encoding)), \
            name
    if encoding == "fp8":  # a NaN byte among the e4m3 codes of k
        data = bytearray(encode_block(*block, fingerprint=FP, encoding=encoding))
        k_codes_at = len(data) - TAG_LEN - 2 * L * BS * NKV * D
        data[k_codes_at] = 0x7F
        assert rejected_as("nonfinite", resign(bytes(data)))


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
