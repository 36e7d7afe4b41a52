"""OpenAI's REST schema (completions, chat completions, models, errors), plus vLLM's sampling
extras. Requests forbid unknown fields, as OpenAI does: a field we would silently ignore is a
field the client thinks is honoured."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

# ---- shared -------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = Field(
        default=False, description="Send one last chunk, with empty choices, carrying the usage.")


class _SamplingFields(_Request):
    """Fields both endpoints take, with vLLM's names and meaning (see SamplingParams)."""

    model: str | None = Field(default=None, description="A served model id (GET /v1/models).")
    n: int | None = Field(default=None, description="Completions to generate per prompt.")
    temperature: float | None = Field(default=None, description="0 is greedy; default 1.")
    top_p: float | None = Field(default=None, description="Nucleus sampling mass in (0, 1].")
    stop: str | list[str] | None = Field(
        default=None, description="Strings that end a completion (not included in its text).")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stream: bool = Field(default=False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = Field(
        default=None, description="Streaming options; only with stream=true.")
    user: str | None = Field(default=None, description="End-user id (accepted, not used).")
    frequency_penalty: float | None = Field(default=None, description="Unsupported unless 0.")
    presence_penalty: float | None = Field(default=None, description="Unsupported unless 0.")
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Unsupported unless empty.")
    # vLLM extras
    top_k: int | None = Field(
        default=None, description="vLLM: sample among the k most likely tokens.")
    min_tokens: int | None = Field(
        default=None, description="vLLM: tokens to generate before EOS or stop tokens may end it.")
    ignore_eos: bool | None = Field(default=None, description="vLLM: keep going past EOS.")
    stop_token_ids: list[StrictInt] | None = Field(
        default=None, description="vLLM: token ids that end a completion.")
    skip_special_tokens: bool | None = Field(
        default=None, description="vLLM: leave special tokens out of the text (default true).")
    include_stop_str_in_output: bool | None = Field(
        default=None, description="vLLM: keep the matched stop string in the text.")

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported; leave it unset or 0")
        return value

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


# ---- completions --------------------------------------------------------------------------


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="Text, a list of texts, token ids, or a list of token id lists.")
    max_tokens: int | None = Field(
        default=16, description="Most tokens to generate per completion.")
    logprobs: int | None = Field(
        default=None, description="Also return the logprobs of this many most likely tokens.")
    echo: bool | None = Field(default=False, description="Unsupported: must be false.")
    suffix: str | None = Field(default=None, description="Unsupported: must be unset.")
    best_of: int | None = Field(default=None, description="Unsupported unless equal to n.")

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        if isinstance(value, list) and (not value or any(v == [] for v in value)):
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo is not supported; leave it unset or false")
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


class CompletionResponse(BaseModel):
    id: str = Field(description="cmpl-<uuid>.")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now, description="Unix time.")
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---- chat completions ---------------------------------------------------------------------


class TextContentPart(_Request):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str


class ChatMessageParam(_Request):
    role: str = Field(description="system, user or assistant (the chat template decides).")
    content: str | list[TextContentPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(default=None, description="Accepted, not used by the template.")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageParam] = Field(
        min_length=1, description="The conversation, rendered with the model's chat template.")
    max_tokens: int | None = Field(
        default=None, description="Deprecated name of max_completion_tokens.")
    max_completion_tokens: int | None = Field(
        default=None, description="Most tokens to generate; default: up to the context length.")
    logprobs: bool | None = Field(default=False, description="Return each token's logprob.")
    top_logprobs: int | None = Field(
        default=None, description="With logprobs: also this many most likely tokens per position.")
    add_generation_prompt: bool = Field(
        default=True, description="vLLM: end the prompt with the assistant turn's opening.")


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(default=None, description="The token's UTF-8 bytes.")


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = Field(
        default=None, description="vLLM: the stop string or token id that ended it.")


class ChatCompletionResponse(BaseModel):
    id: str = Field(description="chatcmpl-<uuid>.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now, description="Unix time.")
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


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
