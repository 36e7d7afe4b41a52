"""Picks the implementation of each hot-path op: Triton on a GPU, torch elsewhere.

`ZAYASERVE_KERNELS=triton|torch` overrides the choice for every op (with `TRITON_INTERPRET=1`,
the Triton kernels also run on the CPU, which is how they are tested); the variable's earlier
name, `ZAYASERVE_KERNEL_BACKEND`, is still read. The engine calls ops only through `get_op`.

Each op's torch implementation lives in a `*_ref` module that never imports triton, its Triton
implementation in the matching `*_triton` module (which imports triton unconditionally), so a
plain CPU install without triton runs everything on the torch kernels.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from functools import cache
from typing import Any, Literal

KernelSet = Literal["torch", "triton"]
ENV_VAR = "ZAYASERVE_KERNELS"
OLD_ENV_VAR = "ZAYASERVE_KERNEL_BACKEND"  # the earlier name, still honoured

# op -> kernel set -> "module:function", imported on first use: only a "triton" entry imports
# triton, so machines without it (or without a GPU) never do.
OPS: dict[str, dict[KernelSet, str]] = {
    "fused_moe": {
        "torch": "zayaserve.kernels.fused_moe_ref:fused_moe_ref",
        "triton": "zayaserve.kernels.fused_moe_triton:fused_moe_triton",
    },
    "paged_attention": {
        "torch": "zayaserve.kernels.paged_attention_ref:paged_attention_torch",
        "triton": "zayaserve.kernels.paged_attention_triton:paged_attention_triton",
    },
    "cca_decode": {
        "torch": "zayaserve.kernels.cca_decode_ref:cca_decode_ref",
        "triton": "zayaserve.kernels.cca_decode_triton:cca_decode_triton",
    },
    "kv_quantize": {
        "torch": "zayaserve.kernels.cache_encoding_ref:quantize_ref",
        "triton": "zayaserve.kernels.cache_encoding_triton:quantize_triton",
    },
    "kv_dequantize": {
        "torch": "zayaserve.kernels.cache_encoding_ref:dequantize_ref",
        "triton": "zayaserve.kernels.cache_encoding_triton:dequantize_triton",
    },
}


def _triton_usable() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    try:
        import torch

        if not torch.cuda.is_available():  # also true on ROCm builds with an AMD GPU
            return False
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _forced() -> str | None:
    return os.environ.get(ENV_VAR) or os.environ.get(OLD_ENV_VAR)


def default_kernels() -> KernelSet:
    # Called for every op on the hot path: resolve once per environment setting.
    return _resolve(_forced(), os.environ.get("TRITON_INTERPRET"))


@cache
def _resolve(forced: str | None, interpret: str | None) -> KernelSet:
    if forced:
        if forced not in ("torch", "triton"):
            raise ValueError(f"{ENV_VAR} must be 'torch' or 'triton', got {forced!r}")
        if forced == "triton" and not _triton_usable():
            raise ValueError(f"{ENV_VAR}=triton needs a GPU or TRITON_INTERPRET=1")
        return forced  # type: ignore[return-value]
    return "triton" if _triton_usable() and _on_gpu() else "torch"


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@cache
def _load(target: str) -> Callable[..., Any]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def get_op(op: str, kernels: KernelSet | None = None) -> Callable[..., Any]:
    """The op's implementation. Unforced, Triton serves tensors on a GPU and the torch
    reference serves CPU tensors, so an engine on `device="cpu"` works on a GPU host too."""
    if op not in OPS:
        raise KeyError(f"unknown kernel op {op!r}; known: {sorted(OPS)}")
    if kernels is None and default_kernels() == "triton" and not _forced():
        return _by_device(op)
    return _load(OPS[op][kernels or default_kernels()])


@cache
def _by_device(op: str) -> Callable[..., Any]:
    def run(first: Any, *args: Any, **kwargs: Any) -> Any:
        on_cpu = getattr(first, "device", None) is not None and first.device.type == "cpu"
        if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            return _load(OPS[op]["torch"])(first, *args, **kwargs)
        return _load(OPS[op]["triton"])(first, *args, **kwargs)

    return run
