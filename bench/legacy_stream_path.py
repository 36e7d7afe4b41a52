"""The streaming output path before `StepDelta` (kept only as the baseline of
`bench/stream_path.py`): every step the engine built a cumulative `RequestOutput` (copying the
token and logprob lists), the worker cut it to a delta, the ingress rebuilt the cumulative
form, and a per-choice cursor sliced the client's delta out of it again."""

from __future__ import annotations

from dataclasses import dataclass, field

from zayaserve.replicas.engine.outputs import CompletionOutput, Logprob, RequestOutput
from zayaserve.replicas.engine.sequence import Request


def make_output(req: Request) -> RequestOutput:
    outs = [CompletionOutput(s.index, s.output.text, s.output_token_ids,
                             s.cumulative_logprob if s.logprobs is not None else None,
                             list(s.logprobs) if s.logprobs is not None else None,
                             s.finish_reason, s.stop_reason)
            for s in sorted(req.seqs, key=lambda s: s.index)]
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, None, outs,
                         req.finished, req.num_cached_tokens)


@dataclass(slots=True)
class WireDelta:  # worker -> ingress
    index: int
    token_ids: list[int]
    text_start: int
    text: str
    logprobs: list[dict[int, Logprob]] | None


@dataclass
class Encoder:  # in the worker
    sent_tokens: dict[int, int] = field(default_factory=dict)
    sent_chars: dict[int, int] = field(default_factory=dict)

    def encode(self, out: RequestOutput) -> list[WireDelta]:
        deltas = []
        for c in out.outputs:
            n = self.sent_tokens.get(c.index, 0)
            start = min(self.sent_chars.get(c.index, 0), len(c.text))
            deltas.append(WireDelta(c.index, c.token_ids[n:], start, c.text[start:],
                                    c.logprobs[n:] if c.logprobs is not None else None))
            self.sent_tokens[c.index], self.sent_chars[c.index] = len(c.token_ids), len(c.text)
        return deltas


class Decoder:  # in the ingress: the cumulative view again
    def __init__(self) -> None:
        self.outputs: dict[int, CompletionOutput] = {}

    def apply(self, deltas: list[WireDelta]) -> list[CompletionOutput]:
        for d in deltas:
            c = self.outputs.setdefault(d.index, CompletionOutput(d.index, "", [], None, []))
            c.token_ids.extend(d.token_ids)
            c.text = c.text[:d.text_start] + d.text
            if d.logprobs is not None and c.logprobs is not None:
                c.logprobs.extend(d.logprobs)
        return [self.outputs[i] for i in sorted(self.outputs)]


@dataclass(slots=True)
class Cursor:  # per choice, in the front end
    chars_sent: int = 0
    tokens_sent: int = 0

    def advance(self, c: CompletionOutput) -> tuple[str, list[int], list[dict[int, Logprob]]]:
        text = c.text[self.chars_sent:]
        ids = c.token_ids[self.tokens_sent:]
        logprobs = list(c.logprobs[self.tokens_sent:]) if c.logprobs is not None else []
        self.chars_sent, self.tokens_sent = len(c.text), len(c.token_ids)
        return text, ids, logprobs
