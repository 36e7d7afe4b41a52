"""Result types returned by the offline API, field-compatible with vLLM's output classes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Logprob:
    """Log probability of one token at one position.

    ``rank`` is 1 + the number of vocabulary entries with a strictly greater logprob, so the
    most likely token has rank 1. ``decoded_token`` is filled in by detokenisation, if at all.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob for the sampled token and the top-k.
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token; the first is None because nothing precedes it to predict it.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    """One of the ``n`` completions of a request.

    ``finish_reason`` is ``"stop"`` (EOS, stop string or stop token) or ``"length"`` (hit
    ``max_tokens`` or the context limit), None while still generating. ``stop_reason`` is the
    stop string or stop token id that ended it, None for EOS or length.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, "
            f"token_ids={self.token_ids}, cumulative_logprob={self.cumulative_logprob}, "
            f"logprobs={self.logprobs}, finish_reason={self.finish_reason}, "
            f"stop_reason={self.stop_reason!r})"
        )


@dataclass(slots=True)
class RequestOutput:
    """Everything produced for one prompt: the prompt echo plus its completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, "
            f"prompt_logprobs={self.prompt_logprobs}, outputs={self.outputs}, "
            f"finished={self.finished}, num_cached_tokens={self.num_cached_tokens})"
        )


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """A finished request's time in the engine, in seconds (travels on its last StepDelta)."""

    queue_s: float  # arrival in the engine -> first scheduled
    prefill_s: float  # first scheduled -> first token
    decode_s: float  # first token -> finished
    ttft_s: float  # arrival in the engine -> first token
    e2e_s: float  # arrival in the engine -> finished
    preemptions: int = 0
    prefill_chunks: int = 0
    local_hit_tokens: int = 0  # prompt tokens served from this worker's prefix cache (L1)
    remote_hit_tokens: int = 0  # ... and from Redis (L2)

    @property
    def inference_s(self) -> float:
        return self.prefill_s + self.decode_s


@dataclass(slots=True)
class CompletionStep:
    """What one step added to one completion: only new tokens, text and logprobs.

    `text` is final: the engine holds back the characters a stop string could still cut off,
    so nothing a client received is ever taken back."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[dict[int, Logprob], ...] | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class StepDelta:
    """One request's news from one engine step; made once, in the engine, and carried
    unchanged to the front ends. The first delta of a request also carries its prompt.
    (Not frozen, as are its `CompletionStep`s: a frozen dataclass costs 4x to construct, and
    the engine makes one per request and step; nothing changes one after it is posted.)"""

    request_id: str
    completions: tuple[CompletionStep, ...]
    finished: bool
    num_cached_tokens: int = 0
    prompt_token_ids: tuple[int, ...] | None = None  # first delta only
    prompt_logprobs: PromptLogprobs | None = None  # first delta only
    metrics: RequestMetrics | None = None  # last delta only: where its time went

    def relabeled(self, request_id: str) -> StepDelta:
        """This delta under its caller's name for the request. In place: a delta is made for
        one stream, and the async engine names it before any reader can see it."""
        self.request_id = request_id
        return self

    def merged(self, later: StepDelta) -> StepDelta:
        """This delta followed by `later`, as one (for a reader that fell behind)."""
        steps = {c.index: c for c in self.completions}
        for c in later.completions:
            old = steps.get(c.index)
            steps[c.index] = c if old is None else CompletionStep(
                c.index, old.token_ids + c.token_ids, old.text + c.text,
                None if old.logprobs is None or c.logprobs is None
                else old.logprobs + c.logprobs,
                c.cumulative_logprob, c.finish_reason, c.stop_reason)
        return StepDelta(later.request_id, tuple(steps[i] for i in sorted(steps)),
                         later.finished, later.num_cached_tokens,
                         self.prompt_token_ids if self.prompt_token_ids is not None
                         else later.prompt_token_ids,
                         self.prompt_logprobs if self.prompt_logprobs is not None
                         else later.prompt_logprobs, later.metrics or self.metrics)


class RequestOutputBuilder:
    """Accumulates a request's deltas into the vLLM-shaped `RequestOutput` (for `LLM.generate`
    and non-streaming responses); O(new tokens) per delta. Texts are joined once, when the
    request finishes."""

    def __init__(self, request_id: str, prompt: str | None) -> None:
        self.output = RequestOutput(request_id, prompt, [], None, [], False)
        self._by_index: dict[int, CompletionOutput] = {}
        self._texts: dict[int, list[str]] = {}

    def add(self, delta: StepDelta) -> RequestOutput:
        out = self.output
        if delta.prompt_token_ids is not None:
            out.prompt_token_ids = list(delta.prompt_token_ids)
            out.prompt_logprobs = delta.prompt_logprobs
        for step in delta.completions:
            c = self._by_index.get(step.index)
            if c is None:
                c = CompletionOutput(step.index, "", [], None,
                                     [] if step.logprobs is not None else None)
                self._by_index[step.index] = c
                self._texts[step.index] = []
                out.outputs.append(c)
                out.outputs.sort(key=lambda o: o.index)
            c.token_ids.extend(step.token_ids)
            self._texts[step.index].append(step.text)
            if c.logprobs is not None and step.logprobs is not None:
                c.logprobs.extend(step.logprobs)
            c.cumulative_logprob = step.cumulative_logprob
            c.finish_reason, c.stop_reason = step.finish_reason, step.stop_reason
        out.finished = delta.finished
        out.num_cached_tokens = delta.num_cached_tokens
        if out.finished:
            for c in out.outputs:
                c.text = "".join(self._texts[c.index])
        return out
