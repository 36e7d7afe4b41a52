"""The checks every endpoint (REST or gRPC) makes before generating, and the sampling
parameters it builds from a request: each failure is a `FrontendError` naming the field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zayaserve.cluster.frontend.engine_client import EngineClient
from zayaserve.cluster.frontend.frontend_errors import (
    InvalidRequestError,
    ModelNotFoundError,
    as_frontend_error,
)
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.observability.safe_text import cap


def build_sampling_params(fields: dict[str, Any], renames: dict[str, str] | None = None
                          ) -> SamplingParams:
    """SamplingParams from the request fields that were set (the rest keep vLLM's defaults)."""
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as err:
        raise as_frontend_error(err, renames) from None


def served_model(requested: str | None, served: Sequence[str]) -> str:
    """The model name to answer with; a name this server does not serve is a 404."""
    if not requested:
        return served[0]
    if requested not in served:
        raise ModelNotFoundError(
            f"The model `{cap(requested)}` does not exist; this server serves {list(served)}",
            "model")
    return requested


def check_context_length(
    client: EngineClient, num_prompt_tokens: int, max_tokens: int | None,
    prompt_field: str, max_tokens_field: str = "max_tokens",
) -> None:
    """Rejects, as vLLM does, a prompt that leaves no room to generate, or a prompt plus
    max_tokens beyond the model's context length."""
    limit = client.max_model_len
    if num_prompt_tokens >= limit:
        raise InvalidRequestError(
            f"{prompt_field}: this model's maximum context length is {limit} tokens, and the "
            f"prompt has {num_prompt_tokens} tokens, leaving no room to generate", prompt_field)
    if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
        raise InvalidRequestError(
            f"{max_tokens_field}: this model's maximum context length is {limit} tokens, but "
            f"{num_prompt_tokens + max_tokens} were requested ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} to generate); lower {max_tokens_field} or shorten the prompt",
            max_tokens_field)


def check_token_ids(client: EngineClient, ids: Sequence[int], field: str) -> None:
    if not ids:
        raise InvalidRequestError(f"{field}: must contain at least one token", field)
    vocab = client.tokenizer.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(
            f"{field}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})", field)


def check_prompt_logprobs(body: Any) -> None:
    """vLLM's prompt_logprobs comes back whole, in the final answer only."""
    if body.prompt_logprobs is not None and body.stream:
        raise InvalidRequestError("prompt_logprobs: not supported with stream=true",
                                  "prompt_logprobs")
