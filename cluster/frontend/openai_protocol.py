"""OpenAI's REST schema (completions, models, errors, and what chat shares with them), plus
vLLM's sampling extras; chat's own models are in openai_chat_protocol.py. Unknown request
fields are ignored with a logged warning, as vLLM does (clients of the vLLM ecosystem send
extras), or refused by name when the server runs with strict_request_fields."""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    WithJsonSchema,
    field_validator,
)

from zayaserve.replicas.engine.params import MAX_LOGPROBS

# ---- shared -------------------------------------------------------------------------------

# Constraints written only into the schema (WithJsonSchema, json_schema_extra) document checks
# that SamplingParams or a validator below makes, with its own field-naming message: the OpenAPI
# schema says what is accepted, and nothing is checked twice.
NonEmptyStr = Annotated[str, WithJsonSchema({"type": "string", "minLength": 1})]


def _integral(value: object) -> object:
    # JSON Schema's "integer" includes 3.0: take it as 3, but no other float, string or bool.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[StrictInt, BeforeValidator(_integral)]
TokenId = Annotated[Int, WithJsonSchema({"type": "integer", "minimum": 0})]
_SEED_RANGE: dict[str, Any] = {"minimum": -(2**63), "maximum": 2**64 - 1}  # torch.Generator's
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string"}, "minItems": 1},
    _TOKEN_IDS,
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
]}


class _Request(BaseModel):
    # Strict: a value of the wrong JSON type is refused, not coerced ("2" is no `n`, 0 is no
    # `echo`), as the schema says and OpenAI does. Unknown fields are kept aside so the server
    # can warn about them and ignore them (vLLM's behaviour), or refuse them in strict mode.
    model_config = ConfigDict(extra="allow", strict=True)
    # Undeclared top-level keys an endpoint reads itself (e.g. chat's flat rsa_* aliases).
    flat_extras: ClassVar[frozenset[str]] = frozenset()


# OpenAI/vLLM fields this server knows of and does not (yet) honour: ignoring one would give an
# answer the client did not ask for, so each is a 400 naming it, strict mode or not.
NOT_SUPPORTED = frozenset({
    "functions", "function_call", "guided_decoding_backend", "guided_whitespace_pattern",
    "audio", "modalities", "prediction", "logits_processors", "lora_request"})


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Paths of the fields a request carried that no model declares, nested ones included."""
    known: frozenset[str] = getattr(type(model), "flat_extras", frozenset())
    found = [f"{prefix}{name}" for name in (model.model_extra or {}) if name not in known]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                where = f"{prefix}{name}[{i}]." if isinstance(value, list) else f"{prefix}{name}."
                found += unknown_fields(item, where)
    return found


class StreamOptions(_Request):
    include_usage: bool = Field(
        default=False, description="Send one last chunk, with empty choices, carrying the usage.")
    continuous_usage_stats: bool = Field(
        default=False, description="vLLM: with include_usage, every chunk also carries the "
        "usage so far.")

    def usage_in_every_chunk(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


# Cross-field rules (checked by each endpoint), for the schema: each an anyOf of the ways to
# satisfy it; a request obeying several satisfies one branch of each (combined in one anyOf:
# schemathesis's coverage phase cannot merge an allOf of them).
_NO_STREAM_OPTIONS = {"properties": {"stream_options": {"type": "null"}}}
_STREAMING = {"required": ["stream"], "properties": {"stream": {"const": True}}}
_NO_TOP_LOGPROBS = {"properties": {"top_logprobs": {"type": "null"}}}
_LOGPROBS = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}


def _all_of_any(*rules: list[dict[str, Any]]) -> dict[str, Any]:
    """{"anyOf": ...} that holds when each rule (a list of alternatives) holds."""
    branches: list[dict[str, Any]] = [{}]
    for alternatives in rules:
        branches = [{"required": sorted({*b.get("required", []), *a.get("required", [])}),
                     "properties": {**b.get("properties", {}), **a["properties"]}}
                    for b in branches for a in alternatives]
    return {"anyOf": [{k: v for k, v in b.items() if v} for b in branches]}


class _SamplingFields(_Request):
    """Fields both endpoints take, with vLLM's names and meaning (see SamplingParams)."""

    model_config = ConfigDict(json_schema_extra=_all_of_any([_NO_STREAM_OPTIONS, _STREAMING]))

    model: str | None = Field(default=None, description="A served model id (GET /v1/models).")
    n: Int | None = Field(default=None, description="Completions to generate per prompt.",
                          json_schema_extra={"minimum": 1})
    temperature: float | None = Field(default=None, description="0 is greedy; default 1.",
                                      json_schema_extra={"minimum": 0})
    top_p: float | None = Field(default=None, description="Nucleus sampling mass in (0, 1].",
                                json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    stop: NonEmptyStr | list[NonEmptyStr] | None = Field(
        default=None, description="Strings that end a completion (not included in its text).")
    seed: Int | None = Field(default=None, description="Seed for reproducible sampling.",
                             json_schema_extra=_SEED_RANGE)
    cache_salt: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="Prefix-cache salt (vLLM's): cached prefixes are shared only among "
        "requests with the same salt (and, when API keys are set, the same key).")
    stream: bool = Field(default=False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = Field(
        default=None, description="Streaming options; only with stream=true.")
    user: str | None = Field(default=None, description="End-user id (accepted, not used).")
    frequency_penalty: float | None = Field(
        default=None, description="Lower the logit of each generated token by this times its "
        "count so far.", json_schema_extra={"minimum": -2, "maximum": 2})
    presence_penalty: float | None = Field(
        default=None, description="Lower the logit of every token generated so far by this.",
        json_schema_extra={"minimum": -2, "maximum": 2})
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Unsupported unless empty.",
        json_schema_extra={"maxProperties": 0})
    # vLLM extras
    top_k: Int | None = Field(
        default=None, description="vLLM: sample among the k most likely tokens (-1 or 0: all).",
        json_schema_extra={"minimum": -1})
    min_tokens: Int | None = Field(
        default=None, description="vLLM: tokens to generate before EOS or stop tokens may end it.",
        json_schema_extra={"minimum": 0})
    prompt_logprobs: Int | None = Field(
        default=None, description="vLLM: return each prompt token's logprob and this many "
        "most likely tokens at each prompt position (not with stream=true).",
        json_schema_extra={"minimum": 0, "maximum": MAX_LOGPROBS})
    min_p: float | None = Field(
        default=None, description="vLLM: drop tokens below min_p x the most likely one's "
        "probability.", json_schema_extra={"minimum": 0, "maximum": 1})
    repetition_penalty: float | None = Field(
        default=None, description="vLLM: > 1 discourages tokens of the prompt and the output.",
        json_schema_extra={"exclusiveMinimum": 0})
    ignore_eos: bool | None = Field(default=None, description="vLLM: keep going past EOS.")
    stop_token_ids: list[TokenId] | None = Field(
        default=None, description="vLLM: token ids that end a completion.")
    skip_special_tokens: bool | None = Field(
        default=None, description="vLLM: leave special tokens out of the text (default true).")
    include_stop_str_in_output: bool | None = Field(
        default=None, description="vLLM: keep the matched stop string in the text.")

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported; leave it unset or empty")
        return value


class UsageInfo(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt(s), counted once per prompt.")
    completion_tokens: int = Field(description="Tokens generated over all choices.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong, naming the field.")
    type: str = Field(description="invalid_request_error, rate_limit_error, server_error, ...")
    param: str | None = Field(default=None, description="The request field to blame, as a path.")
    code: str | None = Field(
        default=None, description="Machine-readable code, e.g. model_not_found.")


class ErrorResponse(BaseModel):
    error: ErrorDetail = Field(description="OpenAI's error envelope.")


def _now() -> int:
    return int(time.time())


# ---- prompt logprobs (both endpoints) ---------------------------------------------------


class PromptLogprob(BaseModel):
    logprob: float = Field(description="Log probability of this token at this position.")
    rank: int | None = Field(default=None, description="1 for the most likely token.")
    decoded_token: str = Field(description="The token's text.")


# vLLM's prompt_logprobs: per prompt position, token id -> its logprob (None for the first).
PromptLogprobsOut = list[dict[str, PromptLogprob] | None]


# ---- models -------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str = Field(description="The name to pass as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "zayaserve"
    max_model_len: int | None = Field(default=None, description="vLLM: the context length.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
