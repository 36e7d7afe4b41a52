"""zayaserve: serving for ZAYA1-style Mixture-of-Experts models.

The offline API is imported on first use (PEP 562), so `import zayaserve.kernels` or Serve's
load of the request router by its dotted path does not pull in the engine and torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zayaserve.replicas.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from zayaserve.replicas.engine.params import SamplingParams
    from zayaserve.replicas.llm import LLM
    from zayaserve.replicas.rsa.params import RSAParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RSAParams"]
__version__ = "0.1.0"

_LAZY = {
    "LLM": "zayaserve.replicas.llm",
    "SamplingParams": "zayaserve.replicas.engine.params",
    "RequestOutput": "zayaserve.replicas.engine.outputs",
    "CompletionOutput": "zayaserve.replicas.engine.outputs",
    "Logprob": "zayaserve.replicas.engine.outputs",
    "RSAParams": "zayaserve.replicas.rsa.params",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
