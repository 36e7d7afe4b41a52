"""`echo` on /v1/completions: the prompt comes back in front of the completion, and with
`logprobs` so do the prompt tokens' logprobs (the first token has none) — exactly the engine's
`prompt_logprobs`. With `max_tokens: 0` nothing is generated: how evaluation harnesses score a
given continuation by its log-likelihood.

The engine always samples at least one token, so a scoring request runs with max_tokens=1 and
the token is dropped here: the answer is the prompt alone, usage counts no completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from zayaserve.cluster.frontend.frontend_errors import InvalidRequestError
from zayaserve.cluster.frontend.logprob_format import completion_logprobs, token_text
from zayaserve.cluster.frontend.openai_completions_protocol import (
    CompletionLogprobs,
    CompletionRequest,
)
from zayaserve.replicas.engine.outputs import PromptLogprobs
from zayaserve.replicas.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Echo:
    enabled: bool
    scoring_only: bool  # max_tokens == 0: the generated token is dropped

    @staticmethod
    def of(body: CompletionRequest) -> Echo:
        if body.max_tokens == 0 and not body.echo:
            raise InvalidRequestError(
                "max_tokens: must be >= 1 (0 only with echo=true, to score the prompt)",
                "max_tokens")
        return Echo(bool(body.echo), body.max_tokens == 0)

    def engine_fields(self, body: CompletionRequest) -> dict[str, object]:
        """What the engine is asked for beyond the body's own sampling fields."""
        if not self.enabled:
            return {}
        fields: dict[str, object] = {}
        if body.logprobs is not None:
            fields["prompt_logprobs"] = body.logprobs
        if self.scoring_only:
            fields["max_tokens"] = 1
        return fields


def prompt_text(tokenizer: Tokenizer, text: str | None, ids: list[int]) -> str:
    return text if text is not None else tokenizer.decode(ids, skip_special_tokens=False)


def prompt_logprobs_layout(tokenizer: Tokenizer, ids: list[int],
                           logprobs: PromptLogprobs | None) -> tuple[CompletionLogprobs, int]:
    """The prompt's tokens in the legacy layout (the first with no logprob); returns it and the
    text offset after the prompt."""
    if not ids:
        return CompletionLogprobs(), 0
    first = token_text(tokenizer, ids[0])
    head = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None],
                              text_offset=[0])
    rest = [entry for entry in (logprobs or [])[1:] if entry is not None]
    if len(rest) != len(ids) - 1:
        return head, len(first)  # the engine gave none (echo without logprobs)
    tail, end = completion_logprobs(tokenizer, ids[1:], rest, len(first))
    joined = join(head, tail)
    assert joined is not None
    return joined, end


def join(a: CompletionLogprobs | None, b: CompletionLogprobs | None) -> CompletionLogprobs | None:
    if a is None or b is None:
        return a if b is None else b
    return CompletionLogprobs(tokens=a.tokens + b.tokens,
                              token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs,
                              text_offset=a.text_offset + b.text_offset)
