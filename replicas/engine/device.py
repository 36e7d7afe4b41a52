"""Where an engine runs: `device="auto"|"cpu"|"cuda"|"cuda:N"` and the dtype that goes with it.

`auto` is the accelerator when torch sees one, else the CPU. ROCm builds of torch expose AMD
GPUs as `cuda` devices too, so MI300X and NVIDIA nodes take the same path. Under Ray, the
worker sees only the GPUs Ray gave it (`CUDA_VISIBLE_DEVICES` / `HIP_VISIBLE_DEVICES`).
"""

from __future__ import annotations

import torch

from zayaserve.replicas.validation_errors import ParamError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


def resolve_device(name: str) -> torch.device:
    """The torch device for a `device` setting; a GPU that is not there is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ParamError("device", f"device: {name!r} is not auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ParamError("device", f"device: {name!r} is not auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ParamError("device", f"device: {name!r} was asked for, but torch sees no GPU "
                         f"(torch {torch.__version__}; a CPU build, or no visible device)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ParamError("device", f"device: {name!r} does not exist; torch sees "
                         f"{torch.cuda.device_count()} GPU(s)")
    return device


def dtype_for(dtype: str, device: torch.device) -> str:
    """`dtype="auto"` is bfloat16 on a GPU and float32 on the CPU (where bf16 matmuls are
    slow); any other name is kept as given."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of an accelerator, or the host's available memory for the CPU (Linux's
    MemAvailable); None where neither can be read."""
    if device.type == "cuda":  # ROCm too (HIP devices are torch "cuda" devices)
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
