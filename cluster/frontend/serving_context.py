"""What every endpoint handler of the front ends needs: the engine client, the served model
names, the metrics, and the per-request limits and parsers the cluster config chose."""

from __future__ import annotations

from dataclasses import dataclass, field

from zayaserve.cluster.frontend.engine_client import EngineClient
from zayaserve.cluster.frontend.metrics import MetricsCollector
from zayaserve.cluster.frontend.response_budget import DEFAULT_MAX_RESPONSE_LOGPROBS
from zayaserve.replicas.rsa.serving import RSALimits


@dataclass(slots=True)
class ServingContext:
    """What every endpoint handler needs."""

    client: EngineClient
    served_model_names: list[str]
    metrics: MetricsCollector
    max_prompts: int = 64  # prompts in one completions request
    reasoning_parser: str | None = None  # "think": <think>...</think> -> reasoning_content
    tool_call_parser: str | None = "hermes"  # tool_choice auto: <tool_call>{...}</tool_call>
    rsa_limits: RSALimits = field(default_factory=RSALimits)  # limits.max_rsa_*
    max_response_logprobs: int = DEFAULT_MAX_RESPONSE_LOGPROBS  # response_budget.py
