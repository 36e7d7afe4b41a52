"""What an RSA chat completion adds to OpenAI's schema: the `rsa` block of the response (the
run's rounds and tokens), cached prompt tokens in `usage`, and the progress chunks of a
streamed run (empty `choices`, an `rsa_progress` object)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from zayaserve.cluster.frontend.openai_chat_protocol import (
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
)
from zayaserve.cluster.frontend.openai_protocol import UsageInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens served from the prefix cache.")


class RSAUsage(UsageInfo):
    prompt_tokens_details: PromptTokensDetails


class RSARound(BaseModel):
    round: int = Field(description="0 samples from the problem; the last one answers.")
    calls: int
    prompt_tokens: int
    cached_tokens: int = Field(description="Of prompt_tokens, served from the prefix cache.")
    completion_tokens: int
    max_context: int = Field(description="The longest prompt + completion of the round's calls.")


class RSAInfo(BaseModel):
    n: int
    k: int = Field(description="Traces per aggregation prompt (k clamped to n).")
    t: int
    tail_tokens: int
    seed: int | None
    calls: int = Field(description="Engine calls over all rounds.")
    max_context: int = Field(description="The longest prompt + completion of any call.")
    max_context_bound: int = Field(
        description="What no call could exceed (checked before the run started).")
    rounds: list[RSARound]
    population: list[list[str]] | None = Field(
        default=None, description="With return_population: every round's traces.")


class RSAProgressOut(BaseModel):
    round: int = Field(description="The round running (0-based).")
    rounds: int
    calls_done: int = Field(description="Calls finished over the whole run.")
    calls_total: int


class RSAChatCompletionResponse(ChatCompletionResponse):
    usage: RSAUsage | None = None  # type: ignore[assignment]
    rsa: RSAInfo


class RSAChatCompletionChunk(ChatCompletionStreamResponse):
    usage: RSAUsage | None = None  # type: ignore[assignment]
    rsa_progress: RSAProgressOut | None = None
    rsa: RSAInfo | None = None
