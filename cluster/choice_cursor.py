"""Per-completion stream cursors: what part of a cumulative engine output is new for the
client (text and token deltas), holding back text that a stop string may yet cut off."""

from __future__ import annotations

from dataclasses import dataclass

from zayaserve.replicas.engine.outputs import CompletionOutput, Logprob
from zayaserve.replicas.engine.params import SamplingParams


@dataclass(slots=True)
class ChoiceDelta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass(slots=True)
class ChoiceCursor:
    """How much of one completion the client has been sent."""

    chars_sent: int = 0
    tokens_sent: int = 0
    text_offset: int = 0  # legacy logprobs' running offset
    finished: bool = False

    def advance(self, completion: CompletionOutput, params: SamplingParams) -> ChoiceDelta | None:
        """What is new since the last call, or None if nothing is. While the completion runs,
        the last len(stop)-1 characters are held back: the next token could complete a stop
        string there, and the engine would then cut that text off."""
        if self.finished:
            return None
        done = completion.finish_reason is not None
        text = completion.text
        visible = len(text)
        if not done and params.stop and not params.include_stop_str_in_output:
            hold = max(len(s) for s in params.stop) - 1
            visible = max(self.chars_sent, len(text) - hold)
        new_text = text[self.chars_sent:visible] if visible > self.chars_sent else ""
        new_ids = completion.token_ids[self.tokens_sent:]
        if not new_text and not new_ids and not done:
            return None
        new_logprobs = (list(completion.logprobs[self.tokens_sent:])
                        if completion.logprobs is not None else None)
        self.chars_sent = max(self.chars_sent, visible)
        self.tokens_sent = len(completion.token_ids)
        self.finished = done
        return ChoiceDelta(new_text, list(new_ids), new_logprobs, completion.finish_reason,
                           completion.stop_reason)
