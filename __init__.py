"""zayaserve: serving for ZAYA1-style Mixture-of-Experts models."""

from zayaserve.cluster.llm import LLM
from zayaserve.replicas.engine.outputs import CompletionOutput, Logprob, RequestOutput
from zayaserve.replicas.engine.params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
