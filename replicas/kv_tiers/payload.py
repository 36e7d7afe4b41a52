"""Wire format of one cached prefix block for the L2 store: every layer's K/V of the block plus
the CCA conv and recurrent-v states at the block's end (a hit without them is a wrong answer).

Layout, little-endian:

    magic        6s   b"ZAYAKV"
    version      u16  FORMAT_VERSION
    fp_len       u16  length of the fingerprint
    fingerprint  fp_len bytes, UTF-8 model fingerprint
    block hash   32 bytes: the key the block was published under
    num_layers, block_size, num_kv_heads, head_dim, conv_k, conv_c, v_state_size   7 x u32
    dtype code   u8   (1 fp32, 2 bf16, 3 fp16: the cache dtype)
    encoding     u8   (0 none, 1 int8, 2 fp8)
    body_len     u64
    body         quantised: k_scales, v_scales (fp32 [L, nkv]) first; then for every encoding
                 conv_state [L, K, C], v_state [L, Dv] (cache dtype), k, v [L, bs, nkv, D]
                 (cache dtype for "none", 1-byte codes for int8/fp8)
    tag          32 bytes: HMAC-SHA256 under the cache secret of everything before it

Sections are ordered widest element first so each starts aligned for its dtype.

Anyone who can write to Redis can write any bytes under any key, so a blob is trusted only when
its tag verifies under this deployment's secret, it names the block hash it is read for (a
valid blob copied under another prefix's key is refused), and every value it carries is finite.
`decode_block` never raises: any mismatch (tag, magic, version, fingerprint, block hash,
shapes, dtype, encoding, length, non-finite values) or a truncated blob returns None and counts
the reason in `rejects`, so a stale, corrupt or forged entry is a cache miss, never a crash.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
from collections import Counter
from typing import NamedTuple

import torch

from zayaserve.kernels.cache_encoding_ref import QDTYPE as _QDTYPE
from zayaserve.kernels.registry import get_op

MAGIC = b"ZAYAKV"
FORMAT_VERSION = 2
ENCODINGS = {"none": 0, "int8": 1, "fp8": 2}
DTYPES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_PRELUDE = struct.Struct("<6sHH")
_SHAPE = struct.Struct("<7IBBQ")
HASH_LEN = 32  # the block hash carried in the header
TAG_LEN = 32  # HMAC-SHA256

rejects: Counter[str] = Counter()  # reason -> count of blobs `decode_block` turned away
_rejects_lock = threading.Lock()


class BlockPayload(NamedTuple):
    k: torch.Tensor  # [L, bs, nkv, D]
    v: torch.Tensor  # [L, bs, nkv, D]
    conv_state: torch.Tensor  # [L, K_conv, C]
    v_state: torch.Tensor  # [L, Dv]


def _raw(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    # A byte view keeps bf16/fp8 exact (numpy has no bf16); native order is little-endian on
    # every platform we serve from.
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def block_nbytes(
    *, fingerprint: str, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
    conv_shape: tuple[int, int], v_state_size: int, dtype: torch.dtype, encoding: str,
) -> int:
    """Size of an encoded block, known before fetching it (for the transfer cost model)."""
    return _header_len(fingerprint) + _body_len(
        num_layers, block_size, num_kv_heads, head_dim, conv_shape, v_state_size,
        torch.tensor([], dtype=dtype).element_size(), encoding) + TAG_LEN


def _header_len(fingerprint: str) -> int:
    return _PRELUDE.size + len(fingerprint.encode()) + HASH_LEN + _SHAPE.size


def _body_len(
    num_layers: int, block_size: int, nkv: int, head_dim: int, conv_shape: tuple[int, int],
    v_state_size: int, elem: int, encoding: str,
) -> int:
    states = num_layers * (conv_shape[0] * conv_shape[1] + v_state_size) * elem
    kv_elems = 2 * num_layers * block_size * nkv * head_dim
    if encoding == "none":
        return states + kv_elems * elem
    return 2 * num_layers * nkv * 4 + states + kv_elems  # fp32 scales + 1-byte codes


def _tag(secret: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


def encode_block(
    k: torch.Tensor, v: torch.Tensor, conv_state: torch.Tensor, v_state: torch.Tensor,
    *, fingerprint: str, encoding: str, block_hash: bytes, secret: bytes,
) -> bytes:
    """Serialise one block, published under `block_hash` and tagged with `secret`.
    k, v [L, bs, nkv, D]; conv_state [L, K_conv, C]; v_state [L, Dv].

    int8/fp8 quantise K and V per (layer, head) with the registry's `kv_quantize` (each layer's
    block is one of its N blocks). The CCA states are ALWAYS stored exactly: they are the inputs
    of the next tokens' conv and delayed v, so an error there would make a resumed sequence
    write different K/V (and emit different logits) than a cold run, and it would carry on
    through the conv window. They are also too few values to be worth squeezing.
    Raises ValueError on inconsistent inputs (a caller bug, unlike a bad blob on decode).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
    if k.dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {list(DTYPES)}, got {k.dtype}")
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [L, bs, nkv, D], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    num_layers, block_size, nkv, head_dim = k.shape
    if conv_state.dim() != 3 or conv_state.shape[0] != num_layers:
        raise ValueError(f"conv_state must be [L={num_layers}, K, C], got "
                         f"{tuple(conv_state.shape)}")
    if v_state.dim() != 2 or v_state.shape[0] != num_layers:
        raise ValueError(f"v_state must be [L={num_layers}, Dv], got {tuple(v_state.shape)}")
    if {v.dtype, conv_state.dtype, v_state.dtype} != {k.dtype}:
        raise ValueError("k, v, conv_state and v_state must share the cache dtype")
    fp = fingerprint.encode()
    if len(fp) > 0xFFFF:
        raise ValueError("fingerprint longer than 65535 bytes")
    if len(block_hash) != HASH_LEN or not secret:
        raise ValueError(f"block_hash must be {HASH_LEN} bytes and secret non-empty")

    if encoding == "none":
        parts = [_raw(conv_state), _raw(v_state), _raw(k), _raw(v)]
    else:
        # The quantisers need finite input: a NaN slice would get scale 1 and decode as junk.
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise ValueError("K/V contain NaN or inf; refusing to quantise them")
        quantize = get_op("kv_quantize", "torch" if k.device.type == "cpu" else None)
        kq, k_scales = quantize(k.contiguous(), encoding)
        vq, v_scales = quantize(v.contiguous(), encoding)
        parts = [_raw(k_scales.float()), _raw(v_scales.float()), _raw(conv_state),
                 _raw(v_state), _raw(kq), _raw(vq)]
    body = b"".join(parts)
    header = _PRELUDE.pack(MAGIC, FORMAT_VERSION, len(fp)) + fp + bytes(block_hash) + _SHAPE.pack(
        num_layers, block_size, nkv, head_dim, conv_state.shape[1], conv_state.shape[2],
        v_state.shape[1], DTYPES[k.dtype], ENCODINGS[encoding], len(body))
    return header + body + _tag(secret, header, body)


def _reject(reason: str) -> None:
    with _rejects_lock:
        rejects[reason] += 1


def decode_block(
    data: bytes | bytearray | memoryview, *, block_hash: bytes, secret: bytes, fingerprint: str,
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
    conv_shape: tuple[int, int], v_state_size: int, dtype: torch.dtype,
    encoding: str | None = None, device: torch.device | str = "cpu",
) -> BlockPayload | None:
    """Parse and check a blob read under `block_hash`; None (reason counted in `rejects`) on
    any mismatch. `encoding=None` accepts any known encoding; `device` is where dequantisation
    runs and the tensors land (1-byte codes cross PCIe, not the widened values)."""
    try:
        result = _decode(bytes(data), bytes(block_hash), secret, fingerprint, num_layers,
                         block_size, num_kv_heads, head_dim, tuple(conv_shape), v_state_size,
                         dtype, encoding, torch.device(device))
    except Exception:  # a blob we cannot parse is a miss; the engine step must go on
        result = "malformed"
    if isinstance(result, str):
        _reject(result)
        return None
    return result


def _decode(
    data: bytes, block_hash: bytes, secret: bytes, fingerprint: str, num_layers: int,
    block_size: int, nkv: int, head_dim: int, conv_shape: tuple[int, ...], v_state_size: int,
    dtype: torch.dtype, encoding: str | None, device: torch.device,
) -> BlockPayload | str:
    """The payload, or the reason it is unusable."""
    if len(data) < _PRELUDE.size + TAG_LEN:
        return "truncated"
    # Nothing in an unauthenticated blob is looked at: the tag comes first.
    if not hmac.compare_digest(_tag(secret, data[:-TAG_LEN]), data[-TAG_LEN:]):
        return "tag"
    data = data[:-TAG_LEN]
    magic, version, fp_len = _PRELUDE.unpack_from(data)
    if magic != MAGIC:
        return "magic"
    if version != FORMAT_VERSION:
        return "version"
    header_len = _PRELUDE.size + fp_len + HASH_LEN + _SHAPE.size
    if len(data) < header_len:
        return "truncated"
    if data[_PRELUDE.size:_PRELUDE.size + fp_len] != fingerprint.encode():
        return "fingerprint"
    at = _PRELUDE.size + fp_len
    if data[at:at + HASH_LEN] != block_hash:
        return "block_hash"  # a valid blob moved under another prefix's key
    *shape, dtype_code, enc_code, body_len = _SHAPE.unpack_from(data, at + HASH_LEN)
    if tuple(shape) != (num_layers, block_size, nkv, head_dim, *conv_shape, v_state_size):
        return "shape"
    if DTYPES.get(dtype) != dtype_code:
        return "dtype"
    enc_name = next((name for name, code in ENCODINGS.items() if code == enc_code), None)
    if enc_name is None or (encoding is not None and enc_name != encoding):
        return "encoding"
    elem = torch.tensor([], dtype=dtype).element_size()
    conv_k, conv_c = conv_shape
    if body_len != _body_len(num_layers, block_size, nkv, head_dim, (conv_k, conv_c),
                             v_state_size, elem, enc_name):
        return "length"
    if len(data) - header_len < body_len:
        return "truncated"
    if len(data) - header_len > body_len:
        return "length"
    body = bytearray(data[header_len:])  # writable (torch.frombuffer), aligned by malloc

    offset = 0

    def take(shape: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
        nonlocal offset
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.tensor([], dtype=dt).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dt)
        t = torch.frombuffer(body, dtype=torch.uint8, count=nbytes, offset=offset)
        offset += nbytes
        return t.view(dt).reshape(shape)

    kv_shape = (num_layers, block_size, nkv, head_dim)
    if enc_name == "none":
        conv = take((num_layers, conv_k, conv_c), dtype)
        v_state = take((num_layers, v_state_size), dtype)
        k, v = take(kv_shape, dtype), take(kv_shape, dtype)
        return _finite(BlockPayload(*(t.to(device) for t in (k, v, conv, v_state))))
    k_scales = take((num_layers, nkv), torch.float32)
    v_scales = take((num_layers, nkv), torch.float32)
    conv = take((num_layers, conv_k, conv_c), dtype)
    v_state = take((num_layers, v_state_size), dtype)
    kq, vq = take(kv_shape, _QDTYPE[enc_name]), take(kv_shape, _QDTYPE[enc_name])
    dequantize = get_op("kv_dequantize", "torch" if device.type == "cpu" else None)
    k = dequantize(kq.to(device), k_scales.to(device), enc_name, dtype)
    v = dequantize(vq.to(device), v_scales.to(device), enc_name, dtype)
    return _finite(BlockPayload(k, v, conv.to(device), v_state.to(device)))


def _finite(payload: BlockPayload) -> BlockPayload | str:
    """NaN or inf anywhere would turn into wrong tokens (greedy emits id 0): refused."""
    ok = torch.stack([t.isfinite().all() for t in payload]).all()
    return payload if bool(ok) else "nonfinite"
