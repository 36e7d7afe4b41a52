"""OpenAI's chat completions schema: messages in, a message (or message deltas) out."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from zayaserve.cluster.frontend.openai_protocol import (
    _LOGPROBS,
    _NO_STREAM_OPTIONS,
    _NO_TOP_LOGPROBS,
    _STREAMING,
    Int,
    PromptLogprobsOut,
    UsageInfo,
    _all_of_any,
    _now,
    _Request,
    _SamplingFields,
)
from zayaserve.cluster.frontend.structured_protocol import StructuredFields
from zayaserve.cluster.frontend.tool_protocol import (
    DeltaToolCall,
    ToolCall,
    ToolCallParam,
    ToolFields,
)
from zayaserve.replicas.engine.params import MAX_LOGPROBS
from zayaserve.replicas.rsa.params import FLAT_KEYS, RSAParams


class TextContentPart(_Request):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str


class ChatMessageParam(_Request):
    role: str = Field(description="system, user, assistant or tool (the chat template "
                      "decides).")
    content: str | list[TextContentPart] | None = Field(
        description="Text, or a list of text parts; null only for an assistant message with "
        "tool_calls.")
    name: str | None = Field(default=None, description="Passed to the chat template.")
    tool_calls: list[ToolCallParam] | None = Field(
        default=None, description="An assistant message's calls.")
    tool_call_id: str | None = Field(
        default=None, description="A tool message: the call it answers.")


class ChatCompletionRequest(_SamplingFields, StructuredFields, ToolFields):
    model_config = ConfigDict(json_schema_extra=_all_of_any(
        [_NO_STREAM_OPTIONS, _STREAMING], [_NO_TOP_LOGPROBS, _LOGPROBS]))

    messages: list[ChatMessageParam] = Field(
        min_length=1, description="The conversation, rendered with the model's chat template.")
    max_tokens: Int | None = Field(
        default=None, description="Deprecated name of max_completion_tokens.",
        json_schema_extra={"minimum": 1})
    max_completion_tokens: Int | None = Field(
        default=None, description="Most tokens to generate; default: up to the context length.",
        json_schema_extra={"minimum": 1})
    logprobs: bool | None = Field(default=False, description="Return each token's logprob.")
    top_logprobs: Int | None = Field(
        default=None, description="With logprobs: also this many most likely tokens per position.",
        json_schema_extra={"minimum": 0, "maximum": MAX_LOGPROBS})
    add_generation_prompt: bool = Field(
        default=True, description="vLLM: end the prompt with the assistant turn's opening.")
    continue_final_message: bool = Field(
        default=False, description="vLLM: continue the last (assistant) message instead of "
        "starting a new turn; needs add_generation_prompt=false.")
    chat_template_kwargs: dict[str, bool | int | float | None] | None = Field(
        default=None, description="vLLM: extra variables for the chat template, e.g. "
        '{"enable_thinking": false}. Values are scalars (no text: it would reach the prompt '
        "unescaped).")
    include_reasoning: bool = Field(
        default=True, description="vLLM: with a reasoning parser, return the thinking as "
        "reasoning_content (false: drop it).")
    metadata: dict[str, str] | None = Field(
        default=None, description="Accepted and not used (at most 16 pairs).",
        json_schema_extra={"maxProperties": 16})
    rsa: RSAParams | None = Field(
        default=None, description="zayaserve: answer with a Markovian RSA run (a population of "
        "traces refined over aggregation rounds, inside the engine). The flat rsa_n, rsa_k, "
        "rsa_t, ... fields are aliases.")

    flat_extras: ClassVar[frozenset[str]] = frozenset(FLAT_KEYS)


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
    reasoning_content: str | None = Field(
        default=None, description="The model's thinking (server run with a reasoning parser).")
    tool_calls: list[ToolCall] = Field(default_factory=list, description="Calls it made.")


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
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
    prompt_logprobs: PromptLogprobsOut | None = Field(
        default=None, description="vLLM: with prompt_logprobs, the rendered prompt's logprobs.")


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] = Field(default_factory=list)


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


