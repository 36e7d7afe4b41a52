"""Token ids in, `StepDelta`s out: detokenizing, stop strings and what a client may see yet.

The engine's step decides everything that depends on token ids alone (eos, stop token ids,
max_tokens, the context limit, grammars) and hands each step's `TokenRecord`s here. The output
processor owns the text: it detokenizes the step's tokens in one batch, looks for stop strings
in the text they added, holds back the characters a stop string could still cut off, and makes
each request's `StepDelta`. A sequence a stop string ended goes to `stops` for the engine to
finish; tokens the engine computed for it meanwhile are dropped here, so what a client gets is
the same whenever the engine hears of the stop (this runs on a thread of its own, see
`output_thread`, or inline after the step).

Its state lives on the sequences and requests (`Sequence.output`, `Request.output`): only this
processor touches it, and it goes when they do (an aborted request leaves nothing behind).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from zayaserve.replicas.engine.outputs import CompletionStep, Logprob, StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.resume import Resume
from zayaserve.replicas.engine.sequence import Request, Sequence
from zayaserve.replicas.model.tokenizer import IncrementalDetokenizer, Tokenizer, add_batch


class TokenRecord(NamedTuple):
    """One sequence's new token from one step, and what the engine made of it."""

    seq: Sequence
    token: int
    logprobs: dict[int, Logprob] | None  # the token's entry, when the request wants logprobs
    cumulative_logprob: float
    finish_reason: str | None  # set when the token ended the sequence by its id or a limit
    stop_reason: int | str | None
    by_token: bool  # ended by eos or a stop token id: its text is not searched for stops


@dataclass(slots=True, eq=False)
class TextState:
    """A completion's text as clients see it (the output processor's, per sequence). Only a
    window of it is kept: what is not sent yet, after the last characters sent that a stop
    string could still begin in (so a long completion never copies its whole text)."""

    detokenizer: IncrementalDetokenizer | None
    text: str = ""  # the window
    sent_chars: int = 0  # characters of the window already in a StepDelta
    num_tokens: int = 0  # output tokens taken (the ones after a stop are dropped)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True, eq=False)
class RequestState:
    """Which of a request's completions have ended, and whether its prompt went out."""

    hold: int  # characters a running completion keeps back (see `request_state`)
    keep: int  # sent characters its window keeps: where a stop string may yet begin
    completions: dict[int, TextState] = field(default_factory=dict)
    prompt_sent: bool = False
    ended: int = 0
    failed: bool = False  # processing its outputs raised: the engine ends it, nothing more


def request_state(params: SamplingParams) -> RequestState:
    """A new request's state. A stop string may begin up to its length - 1 characters before
    the text a token adds, so that many sent characters stay in each window; unless the stop
    string is kept in the output, as many are held back from the client, since a stop string
    completed later would cut them off and what a client got is never taken back."""
    keep = max(len(s) for s in params.stop) - 1 if params.stop else 0
    return RequestState(0 if params.include_stop_str_in_output else keep, keep)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        # Sequences ended by a stop string, with it, for the engine to finish (thread-safe:
        # appended here, taken by the engine thread).
        self.stops: deque[tuple[Sequence, str]] = deque()

    def text_state(self, seq: Sequence) -> TextState:
        state = seq.output
        if state is None:
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, seq.request.prompt_token_ids,
                                               skip_special_tokens=seq.params.skip_special_tokens)
            state = seq.output = TextState(detok)
            req_state = seq.request.output
            if req_state is None:
                req_state = seq.request.output = request_state(seq.params)
            req_state.completions[seq.index] = state
        assert isinstance(state, TextState)
        return state

    def resume(self, seq: Sequence, resume: Resume) -> None:
        """Text state of a sequence resumed with outputs its client already has (`resume`):
        their text made as the uninterrupted run made it, token by token, of which the
        characters sent are sent; the rest (held back for a stop string) is still to send."""
        state = self.text_state(seq)
        for token in resume.output_token_ids:
            if state.detokenizer is not None:
                state.text += state.detokenizer.add(token)
        state.num_tokens = len(resume.output_token_ids)
        state.sent_chars = min(resume.sent_chars, len(state.text))

    @staticmethod
    def failed(rec: TokenRecord) -> bool:
        return rec.seq.request.output is not None and rec.seq.request.output.failed

    @staticmethod
    def fail(records: list[TokenRecord]) -> set[str]:
        """Marks the records' requests failed (their later records are dropped); their ids."""
        for rec in records:
            req = rec.seq.request
            if req.output is None:
                req.output = request_state(req.params)
            req.output.failed = True
        return {rec.seq.request.request_id for rec in records}

    def process(self, records: list[TokenRecord]) -> list[StepDelta]:
        """One step's records -> one StepDelta per request that got visible news."""
        live: list[tuple[TokenRecord, TextState]] = []
        detoks: list[IncrementalDetokenizer | None] = []
        for rec in records:
            seq = rec.seq
            state = seq.output or self.text_state(seq)
            if state.finish_reason is not None:  # computed after a stop string ended it
                continue
            live.append((rec, state))
            # A stop token id that ends a constrained text is the grammar's stop token
            # (grammar.py): like eos, it is not part of the text the grammar accepted.
            detoks.append(None if seq.grammar is not None and rec.token in (
                seq.params.stop_token_ids or ()) else state.detokenizer)
        texts = add_batch(detoks, [rec.token for rec, _ in live])
        touched: dict[int, tuple[Request, list[tuple[TokenRecord, TextState]]]] = {}
        for (rec, state), delta in zip(live, texts, strict=True):
            self._take(rec, state, delta)
            req = rec.seq.request
            group = touched.get(id(req))
            if group is None:
                touched[id(req)] = (req, [(rec, state)])
            else:
                group[1].append((rec, state))
        return [self.request_delta(req, group) for req, group in touched.values()]

    def _take(self, rec: TokenRecord, state: TextState, delta: str) -> None:
        p = rec.seq.params
        state.num_tokens += 1
        state.text += delta
        finish, reason = rec.finish_reason, rec.stop_reason
        if not rec.by_token and p.stop and delta and state.num_tokens >= p.min_tokens:
            text = state.text
            for stop in p.stop:
                # Only the tail that this token could have completed needs searching.
                at = text.find(stop, max(0, len(text) - len(delta) - len(stop) + 1))
                if at >= 0:
                    state.text = text[:at + len(stop) if p.include_stop_str_in_output else at]
                    state.finish_reason, state.stop_reason = "stop", stop
                    if finish is None:
                        self.stops.append((rec.seq, stop))
                    return
        if finish is not None and state.detokenizer is not None:
            state.text += state.detokenizer.flush()  # bytes held for an unfinished character
        state.finish_reason, state.stop_reason = finish, reason

    def request_delta(self, req: Request, group: list[tuple[TokenRecord, TextState]]
                      ) -> StepDelta:
        """The request's news from this step, for the completions that got a token (O(new))."""
        req_state: RequestState = req.output
        hold, keep = req_state.hold, req_state.keep
        wants_logprobs = req.params.logprobs is not None
        steps = []
        if len(group) > 1:
            group.sort(key=lambda g: g[0].seq.index)
        for rec, s in group:
            done = s.finish_reason is not None
            req_state.ended += done
            text = s.text
            visible = len(text) if done else max(s.sent_chars, len(text) - hold)
            steps.append(CompletionStep(
                rec.seq.index, (rec.token,), text[s.sent_chars:visible],
                None if not wants_logprobs else (
                    (rec.logprobs,) if rec.logprobs is not None else ()),
                rec.cumulative_logprob if wants_logprobs else None,
                s.finish_reason, s.stop_reason))
            if visible > keep:  # what is sent, less the tail a stop string may begin in
                s.text, s.sent_chars = text[visible - keep:], keep
            else:
                s.sent_chars = visible
        first = not req_state.prompt_sent
        req_state.prompt_sent = True
        finished = req_state.ended == req.params.n
        metrics = None
        if finished:
            ordered = [req_state.completions[i] for i in sorted(req_state.completions)]
            metrics = req.timeline.finish([s.num_tokens for s in ordered],
                                          [s.finish_reason or "" for s in ordered])
        return StepDelta(
            req.request_id, tuple(steps), finished, req.num_cached_tokens,
            tuple(req.prompt_token_ids) if first else None,
            list(req.prompt_logprobs) if first and req.prompt_logprobs is not None else None,
            metrics)
