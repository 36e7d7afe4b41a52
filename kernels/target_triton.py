"""The target the Triton kernels are compiled for, read once by each kernel module to pick its
configs: "cuda", "hip" (AMD), "interpreter" (TRITON_INTERPRET=1), or "none" (no GPU driver:
the kernels are never launched on this machine)."""

from __future__ import annotations

import os

import triton


def triton_target() -> str:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    try:
        return str(triton.runtime.driver.active.get_current_target().backend)
    except Exception:  # no active driver (CPU-only torch)
        return "none"
