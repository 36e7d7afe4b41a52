"""OpenAI's `usage` of a response: counted from a stream's deltas, or from whole outputs."""

from __future__ import annotations

from collections.abc import Sequence

from zayaserve.cluster.frontend.openai_protocol import UsageInfo
from zayaserve.replicas.engine.outputs import RequestOutput, StepDelta


class UsageCounter:
    """Usage of a streamed response, counted from its deltas (O(1) per delta)."""

    def __init__(self) -> None:
        self.prompt = self.completion = 0

    def add(self, delta: StepDelta, count_completion: bool = True) -> None:
        if delta.prompt_token_ids is not None:
            self.prompt += len(delta.prompt_token_ids)
        if count_completion:  # not when scoring a prompt (the one token is dropped)
            self.completion += sum(len(c.token_ids) for c in delta.completions)

    def usage(self) -> UsageInfo:
        return UsageInfo(prompt_tokens=self.prompt, completion_tokens=self.completion,
                         total_tokens=self.prompt + self.completion)


def usage_of(outputs: Sequence[RequestOutput]) -> UsageInfo:
    """Each prompt counts once however many completions it has, as OpenAI counts it."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)
