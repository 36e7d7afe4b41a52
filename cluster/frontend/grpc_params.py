"""The gRPC request's `sampling` message as `SamplingParams` (vLLM's names; unset optional
fields keep their defaults), and the field paths errors name."""

from __future__ import annotations

from typing import Any

from zayaserve.cluster.frontend.api_keys import cache_salt
from zayaserve.cluster.frontend.frontend_errors import InvalidRequestError
from zayaserve.cluster.frontend.request_checks import build_sampling_params
from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.replicas.engine.params import SamplingParams

_OPTIONAL_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "seed", "ignore_eos", "max_tokens", "min_tokens",
    "logprobs", "skip_special_tokens", "include_stop_str_in_output", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty")
# SamplingParams names its fields bare; here they live under `sampling`.
RENAMES = {name: f"sampling.{name}" for name in SamplingParams.__dataclass_fields__}


def sampling_params(request: pb.GenerateRequest, tenant: str | None) -> SamplingParams:
    if request.HasField("cache_salt") and not 0 < len(request.cache_salt) <= 256:
        raise InvalidRequestError("cache_salt: must be 1 to 256 characters", "cache_salt")
    s = request.sampling
    fields: dict[str, Any] = {name: getattr(s, name) for name in _OPTIONAL_SAMPLING_FIELDS
                              if s.HasField(name)}
    if s.stop:
        fields["stop"] = list(s.stop)
    if s.stop_token_ids:
        fields["stop_token_ids"] = list(s.stop_token_ids)
    if s.HasField("structured_outputs"):
        fields["structured_outputs"] = _structured(s.structured_outputs)
    fields["cache_salt"] = cache_salt(
        tenant, request.cache_salt if request.HasField("cache_salt") else None)
    return build_sampling_params(fields, RENAMES)


def _structured(spec: pb.StructuredOutputs) -> dict[str, Any]:
    kind = spec.WhichOneof("kind")
    if kind is None:
        raise InvalidRequestError("sampling.structured_outputs: set one of json, regex, choice, "
                                  "grammar, json_object", "sampling.structured_outputs")
    value = list(spec.choice.choices) if kind == "choice" else getattr(spec, kind)
    return {kind: value, "disable_any_whitespace": spec.disable_any_whitespace}
