"""Compact per-step updates of a request's output, for streaming between processes.

Engines produce cumulative `RequestOutput`s; sending those every step costs O(n^2) over a long
generation. A worker sends only what is new (tokens, logprobs and text), and the receiver
rebuilds the cumulative view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zayaserve.replicas.engine.outputs import CompletionOutput, Logprob, RequestOutput


@dataclass(slots=True)
class CompletionDelta:
    index: int
    token_ids: list[int]
    # The completion's text is its old text cut to `text_start` characters, then `text`: only
    # new characters travel, and a stop string found later can still cut what was sent.
    text_start: int
    text: str
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass(slots=True)
class OutputDelta:
    request_id: str
    finished: bool
    completions: list[CompletionDelta]
    prompt_token_ids: list[int] | None = None  # first delta only
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # first delta only
    num_cached_tokens: int = 0


@dataclass
class DeltaEncoder:
    """Worker side: remembers how much of each completion has been sent."""

    sent_tokens: dict[int, int] = field(default_factory=dict)
    sent_chars: dict[int, int] = field(default_factory=dict)
    first: bool = True

    def encode(self, out: RequestOutput) -> OutputDelta:
        comps = []
        for c in out.outputs:
            n = self.sent_tokens.get(c.index, 0)
            start = min(self.sent_chars.get(c.index, 0), len(c.text))
            comps.append(CompletionDelta(
                c.index, c.token_ids[n:], start, c.text[start:],
                c.logprobs[n:] if c.logprobs is not None else None,
                c.cumulative_logprob, c.finish_reason, c.stop_reason))
            self.sent_tokens[c.index] = len(c.token_ids)
            self.sent_chars[c.index] = len(c.text)
        delta = OutputDelta(out.request_id, out.finished, comps,
                            num_cached_tokens=out.num_cached_tokens)
        if self.first:
            delta.prompt_token_ids = out.prompt_token_ids
            delta.prompt_logprobs = out.prompt_logprobs
            self.first = False
        return delta


class DeltaDecoder:
    """Receiver side: applies deltas to a cumulative `RequestOutput`."""

    def __init__(self, prompt: str | None) -> None:
        self.prompt = prompt
        self.out: RequestOutput | None = None

    def apply(self, delta: OutputDelta) -> RequestOutput:
        if self.out is None:
            self.out = RequestOutput(delta.request_id, self.prompt,
                                     delta.prompt_token_ids or [], delta.prompt_logprobs, [],
                                     False, delta.num_cached_tokens)
        by_index = {c.index: c for c in self.out.outputs}
        for d in delta.completions:
            c = by_index.get(d.index)
            if c is None:
                c = CompletionOutput(d.index, "", [], None,
                                     [] if d.logprobs is not None else None)
                self.out.outputs.append(c)
                by_index[d.index] = c
            c.token_ids.extend(d.token_ids)
            c.text = c.text[:d.text_start] + d.text
            if d.logprobs is not None and c.logprobs is not None:
                c.logprobs.extend(d.logprobs)
            c.cumulative_logprob = d.cumulative_logprob
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
        self.out.outputs.sort(key=lambda c: c.index)
        self.out.finished = delta.finished
        self.out.num_cached_tokens = delta.num_cached_tokens
        return self.out
