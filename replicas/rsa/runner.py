"""Runs one Markovian RSA request over an engine's `generate` (in the worker, or the offline
engine): each round's calls are submitted together, so the engine batches them and its prefix
cache shares their common prompt; nothing leaves the process between rounds.

Round r's members see only the carried tails of round r-1 (`prompts.carry_tail`), so round r-1's
outputs are dropped as soon as round r's prompts are built. Cancelling the run (a client gone)
closes every call's stream, which aborts it in the engine and frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from zayaserve.replicas.engine.outputs import RequestOutput, RequestOutputBuilder, StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.rsa.params import RSAParams, call_counts
from zayaserve.replicas.rsa.prompts import aggregation_prompt, carry_tail
from zayaserve.replicas.rsa.seeds import choose_subsets, derive_seed

# (request id, prompt ids, params, prompt text) -> the call's deltas (AsyncLLMEngine.generate).
Generate = Callable[[str, list[int], SamplingParams, str | None], AsyncGenerator[StepDelta, None]]
# An aggregation message -> (prompt text, prompt ids) as the model sees it (chat template or
# plain encoding).
Render = Callable[[str], tuple[str, list[int]]]


@dataclass(frozen=True, slots=True)
class RoundStats:
    """One round's calls and tokens; `max_context` is its longest prompt + completion."""

    index: int
    calls: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    max_context: int


@dataclass(slots=True)
class RSAResult:
    answers: list[RequestOutput]  # the final round's calls, one per answer
    rounds: list[RoundStats] = field(default_factory=list)
    population: list[list[str]] | None = None  # every round's texts (return_population)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.rounds)

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens for r in self.rounds)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.rounds)


def round_params(p: RSAParams, round_index: int, call: int, final: bool) -> SamplingParams:
    """A call's sampling: the final round's settings or the rounds' temperature, and its own
    seed derived from (seed, round, call)."""
    seed = derive_seed(p.seed, round_index, call)
    if final:
        s = p.final_sampling
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              max_tokens=p.final_max_tokens, seed=seed)
    return SamplingParams(temperature=p.round_temperature, max_tokens=p.round_max_tokens,
                          seed=seed)


class TextCodec(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class RSARun:
    """One request's run. `problem` is the question as text (what `{problem}` shows);
    `first` its rendered prompt for round 0; `think_end_ids` the tokenization of `</think>`;
    `codec` (the tokenizer) turns carried ids back into text."""

    def __init__(self, generate: Generate, render: Render, codec: TextCodec,
                 params: RSAParams, request_id: str, think_end_ids: Sequence[int] = ()) -> None:
        self.generate, self.render, self.codec = generate, render, codec
        self.p, self.request_id, self.think_end_ids = params, request_id, list(think_end_ids)
        self.calls_done = 0  # progress, for streaming

    async def run(self, problem: str, first: tuple[str, list[int]]) -> RSAResult:
        p = self.p
        counts = call_counts(p)
        result = RSAResult(answers=[], population=[] if p.return_population else None)
        previous: list[list[int]] = []
        for r, count in enumerate(counts):
            final = r == len(counts) - 1
            if r == 0:
                prompts = [first] * count
            else:
                subsets = choose_subsets(p.seed, r, len(previous), p.effective_k, count)
                tails = [self._tail_text(ids) for ids in previous]
                prompts = [self.render(aggregation_prompt(
                    problem, [tails[i] for i in subset], p.aggregation_template))
                    for subset in subsets]
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

    def _tail_text(self, output_ids: list[int]) -> str:
        """A trace's carried tail as text that still encodes to at most tail_tokens: decoding
        can grow the count (a token cut mid-character decodes to U+FFFD, which encodes to
        several), so the text loses characters at its start until it fits."""
        p, codec = self.p, self.codec
        text = codec.decode(carry_tail(output_ids, self.think_end_ids, p.carry, p.tail_tokens))
        while text and len(codec.encode(text, add_special_tokens=False)) > p.tail_tokens:
            over = len(codec.encode(text, add_special_tokens=False)) - p.tail_tokens
            text = text[max(1, over):]
        return text

    async def _round(self, r: int, prompts: list[tuple[str, list[int]]],
                     final: bool) -> list[RequestOutput]:
        """The round's calls, as a group: the first one alone until its prompt is computed
        (its first token), then the rest, which find the shared prefix (the problem, or the
        template's head and the problem) in the prefix cache instead of computing it again."""
        started = asyncio.Event()
        calls = [asyncio.ensure_future(self._call(
            f"{self.request_id}-r{r}-0", prompts[0][1], round_params(self.p, r, 0, final),
            prompts[0][0], started))]
        leader_ready = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait([calls[0], leader_ready], return_when=asyncio.FIRST_COMPLETED)
            calls += [asyncio.ensure_future(self._call(
                f"{self.request_id}-r{r}-{i}", ids, round_params(self.p, r, i, final), text))
                for i, (text, ids) in enumerate(prompts) if i > 0]
            return list(await asyncio.gather(*calls))
        finally:
            leader_ready.cancel()
            for call in calls:  # cancelled, or one failed: the others must not run on
                call.cancel()

    async def _call(self, call_id: str, ids: list[int], params: SamplingParams,
                    text: str | None, started: asyncio.Event | None = None) -> RequestOutput:
        builder = RequestOutputBuilder(call_id, text)
        # aclosing: a cancelled run closes the stream, which aborts the call in the engine.
        async with contextlib.aclosing(self.generate(call_id, ids, params, text)) as deltas:
            async for delta in deltas:
                builder.add(delta)
                if started is not None:
                    started.set()
        self.calls_done += 1
        return builder.output
