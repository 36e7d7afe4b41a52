"""OpenAI's legacy completions schema (POST /v1/completions), with vLLM's extras."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, WithJsonSchema, field_validator

from zayaserve.cluster.frontend.openai_protocol import (
    _PROMPT_SCHEMA,
    Int,
    PromptLogprobsOut,
    TokenId,
    UsageInfo,
    _now,
    _SamplingFields,
)
from zayaserve.cluster.frontend.structured_protocol import StructuredFields
from zayaserve.replicas.engine.params import MAX_LOGPROBS


class CompletionRequest(_SamplingFields, StructuredFields):
    prompt: Annotated[str | list[str] | list[TokenId] | list[list[TokenId]],
                      WithJsonSchema(_PROMPT_SCHEMA)] = Field(
        description="Text, a list of texts, token ids, or a list of token id lists.")
    max_tokens: Int | None = Field(
        default=16, description="Most tokens to generate per completion (0 with echo: score "
        "the prompt, generate nothing).", json_schema_extra={"minimum": 0})
    logprobs: Int | None = Field(
        default=None, description="Also return the logprobs of this many most likely tokens.",
        json_schema_extra={"minimum": 0, "maximum": MAX_LOGPROBS})
    echo: bool | None = Field(
        default=False, description="Return the prompt before the completion (and, with "
        "logprobs, the prompt tokens' logprobs).")
    suffix: str | None = Field(default=None, description="Unsupported: must be unset.",
                               json_schema_extra={"maxLength": 0})
    best_of: Int | None = Field(default=None, description="Unsupported unless equal to n.",
                                json_schema_extra={"minimum": 1})

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        if isinstance(value, list) and (not value or any(v == [] for v in value)):
            raise ValueError("must not be empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs layout: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list, description="Each generated token's text.")
    token_logprobs: list[float | None] = Field(default_factory=list,
                                               description="Each token's logprob.")
    top_logprobs: list[dict[str, float] | None] = Field(
        default_factory=list, description="Most likely tokens at each position -> logprob.")
    text_offset: list[int] = Field(default_factory=list,
                                   description="Where each token starts in the choice's text.")


class CompletionChoice(BaseModel):
    index: int = Field(description="prompt index * n + completion index.")
    text: str = Field(description="Generated text (the delta, when streaming).")
    logprobs: CompletionLogprobs | None = Field(default=None, description="When asked for.")
    finish_reason: Literal["stop", "length"] | None = Field(
        default=None, description="Why it ended; null while streaming.")
    stop_reason: int | str | None = Field(
        default=None, description="vLLM: the stop string or token id that ended it.")
    prompt_logprobs: PromptLogprobsOut | None = Field(
        default=None, description="vLLM: with prompt_logprobs, the prompt's logprobs.")


class CompletionResponse(BaseModel):
    id: str = Field(description="cmpl-<uuid>.")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now, description="Unix time.")
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
