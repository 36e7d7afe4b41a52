"""Runs one Markovian RSA request over an engine's `generate` (in the worker, or the offline
engine): a round's first call goes alone until its prompt is computed, then the rest together,
so the engine batches them and they find the shared prefix in its prefix cache; nothing leaves
the process between rounds.

Round r's members see only the carried tails of round r-1 (`prompts.carry_tail`), so round r-1's
outputs are dropped as soon as round r's prompts are built. Cancelling the run (a client gone)
closes every call's stream, which aborts it in the engine and frees its blocks. `emit` gets
the run's progress and the final round's deltas as they happen (see `events`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from zayaserve.replicas.engine.outputs import RequestOutput, RequestOutputBuilder, StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.rsa.events import (
    RoundStats,
    RoundTotals,
    RSAAnswerDelta,
    RSAEvent,
    RSAProgress,
)
from zayaserve.replicas.rsa.params import RSAParams, call_counts
from zayaserve.replicas.rsa.prompts import aggregation_prompt, carry_tail
from zayaserve.replicas.rsa.seeds import choose_subsets, derive_seed

# (request id, prompt ids, params, prompt text) -> the call's deltas (AsyncLLMEngine.generate).
Generate = Callable[[str, list[int], SamplingParams, str | None], AsyncGenerator[StepDelta, None]]
# An aggregation message -> (prompt text, prompt ids) as the model sees it (chat template or
# plain encoding).
Render = Callable[[str], tuple[str, list[int]]]


@dataclass(slots=True)
class RSAResult(RoundTotals):
    answers: list[RequestOutput]  # the final round's calls, one per answer
    rounds: list[RoundStats] = field(default_factory=list)
    population: list[list[str]] | None = None  # every round's texts (return_population)


def round_params(p: RSAParams, round_index: int, call: int, final: bool,
                 cache_salt: str | None = None) -> SamplingParams:
    """A call's sampling: the final round's settings or the rounds' temperature, and its own
    seed derived from (seed, round, call); `cache_salt` is the request's (tenant isolation)."""
    seed = derive_seed(p.seed, round_index, call)
    if final:
        s = p.final_sampling
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              max_tokens=p.final_max_tokens, seed=seed, cache_salt=cache_salt)
    return SamplingParams(temperature=p.round_temperature, max_tokens=p.round_max_tokens,
                          seed=seed, cache_salt=cache_salt)


class TextCodec(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


# Text longer than this many characters per token of the bound is refused before it is
# tokenized: no real vocabulary has longer tokens on average.
MAX_CHARS_PER_TOKEN = 64


class RSABoundError(RuntimeError):
    """An aggregation prompt over the bound the run was admitted with (a server bug, or a
    template the preflight did not foresee): the run stops rather than cost more."""


class RSARun:
    """One request's run. `problem` is the question as text (what `{problem}` shows);
    `first` its rendered prompt for round 0; `think_end_ids` the tokenization of `</think>`;
    `codec` (the tokenizer) turns carried ids back into text."""

    def __init__(self, generate: Generate, render: Render, codec: TextCodec,
                 params: RSAParams, request_id: str, think_end_ids: Sequence[int] = (),
                 cache_salt: str | None = None,
                 emit: Callable[[RSAEvent], None] | None = None,
                 bound: int | None = None) -> None:
        self.generate, self.render, self.codec = generate, render, codec
        self.bound = bound  # prompt + max_tokens of any call (preflight's), None: unchecked
        self.p, self.request_id, self.think_end_ids = params, request_id, list(think_end_ids)
        self.cache_salt = cache_salt
        self.emit = emit or (lambda event: None)
        self.counts = call_counts(params)
        self.round = 0
        self.calls_done = 0  # progress, for streaming

    def _progress(self) -> None:
        self.emit(RSAProgress(self.round, len(self.counts), self.calls_done, sum(self.counts)))

    async def run(self, problem: str, first: tuple[str, list[int]]) -> RSAResult:
        p = self.p
        counts = self.counts
        result = RSAResult(answers=[], population=[] if p.return_population else None)
        previous: list[list[int]] = []
        for r, count in enumerate(counts):
            final = r == len(counts) - 1
            self.round = r
            self._progress()
            if r == 0:
                prompts = [first] * count
            else:
                # Decoding tails, rendering and tokenizing every prompt of the round: CPU work
                # for a thread, not the event loop that streams every other request.
                prompts = await asyncio.to_thread(self._aggregation_prompts, problem, previous,
                                                  r, count, final)
            outputs = await self._round(r, prompts, final)
            result.rounds.append(RoundStats(
                r, count, sum(len(ids) for _, ids in prompts),
                sum(o.num_cached_tokens for o in outputs),
                sum(len(o.outputs[0].token_ids) for o in outputs),
                max(len(ids) + len(o.outputs[0].token_ids)
                    for (_, ids), o in zip(prompts, outputs, strict=True))))
            if result.population is not None:
                result.population.append([o.outputs[0].text for o in outputs])
            previous = [o.outputs[0].token_ids for o in outputs]
            if final:
                result.answers = list(outputs)
        return result

    def _aggregation_prompts(self, problem: str, previous: list[list[int]], r: int,
                             count: int, final: bool) -> list[tuple[str, list[int]]]:
        p = self.p
        subsets = choose_subsets(p.seed, r, len(previous), p.effective_k, count)
        tails = [self._tail_text(ids) for ids in previous]
        max_tokens = p.final_max_tokens if final else p.round_max_tokens
        prompts = []
        for subset in subsets:
            message = aggregation_prompt(problem, [tails[i] for i in subset],
                                         p.aggregation_template)
            if self.bound is not None and len(message) > MAX_CHARS_PER_TOKEN * self.bound:
                raise RSABoundError(f"rsa: an aggregation prompt of {len(message)} characters "
                                    f"cannot fit the run's bound of {self.bound} tokens")
            text, ids = self.render(message)
            if self.bound is not None and len(ids) + max_tokens > self.bound:
                raise RSABoundError(f"rsa: an aggregation prompt of {len(ids)} tokens plus "
                                    f"{max_tokens} to generate exceeds the run's bound of "
                                    f"{self.bound}")
            prompts.append((text, ids))
        return prompts

    def _tail_text(self, output_ids: list[int]) -> str:
        """A trace's carried tail as text that still encodes to at most tail_tokens: decoding
        can grow the count (a token cut mid-character decodes to U+FFFD, which encodes to
        several), so the text loses characters at its start until it fits."""
        p, codec = self.p, self.codec
        text = codec.decode(carry_tail(output_ids, self.think_end_ids, p.carry, p.tail_tokens))
        while text and (over := len(codec.encode(text, add_special_tokens=False))
                        - p.tail_tokens) > 0:
            text = text[over:]
        return text

    async def _round(self, r: int, prompts: list[tuple[str, list[int]]],
                     final: bool) -> list[RequestOutput]:
        """The round's calls, as a group: the first one alone until its prompt is computed
        (its first token), then the rest, which find the shared prefix (the problem, or the
        template's head and the problem) in the prefix cache instead of computing it again."""
        started = asyncio.Event()
        answer = 0 if final else None
        calls = [asyncio.ensure_future(self._call(
            f"{self.request_id}-r{r}-0", prompts[0][1], self._params(r, 0, final),
            prompts[0][0], started, answer))]
        leader_ready = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait([calls[0], leader_ready], return_when=asyncio.FIRST_COMPLETED)
            calls += [asyncio.ensure_future(self._call(
                f"{self.request_id}-r{r}-{i}", ids, self._params(r, i, final), text,
                answer=i if final else None))
                for i, (text, ids) in enumerate(prompts) if i > 0]
            return list(await asyncio.gather(*calls))
        finally:
            leader_ready.cancel()
            for call in calls:  # cancelled, or one failed: the others must not run on
                call.cancel()

    def _params(self, r: int, call: int, final: bool) -> SamplingParams:
        return round_params(self.p, r, call, final, self.cache_salt)

    async def _call(self, call_id: str, ids: list[int], params: SamplingParams,
                    text: str | None, started: asyncio.Event | None = None,
                    answer: int | None = None) -> RequestOutput:
        """One engine call; `answer` is its choice index when it is a final-round call (its
        deltas are passed on as they come)."""
        builder = RequestOutputBuilder(call_id, text)
        # aclosing: a cancelled run closes the stream, which aborts the call in the engine.
        async with contextlib.aclosing(self.generate(call_id, ids, params, text)) as deltas:
            async for delta in deltas:
                builder.add(delta)
                if answer is not None:
                    self.emit(RSAAnswerDelta(answer, delta))
                if started is not None:
                    started.set()
        self.calls_done += 1
        self._progress()
        return builder.output
