"""Markovian RSA run inside one engine (tiny model: the answers mean nothing, the mechanics do)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pytest

from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.rsa.params import RSAParams, max_context
from zayaserve.replicas.rsa.prompts import aggregation_prompt, carry_tail
from zayaserve.replicas.rsa.rounds import RSARun
from zayaserve.replicas.rsa.seeds import choose_subsets

PROBLEM = "What is the sum of the first ten odd numbers? Explain every step of it carefully."
BLOCK = 4


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Any) -> Iterator[AsyncLLMEngine]:
    e = AsyncLLMEngine(LLMEngine(EngineConfig(
        model=str(tiny_checkpoint), num_kv_blocks=512, block_size=BLOCK,
        enable_prefix_caching=True)))
    yield e
    e.shutdown()


class Recorder:
    """The engine's generate, recording every call's prompt and output ids."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        self.calls: dict[str, tuple[list[int], list[int]]] = {}

    async def generate(self, rid: str, ids: list[int], params: SamplingParams,
                       text: str | None) -> AsyncGenerator[StepDelta, None]:
        out: list[int] = []
        async for delta in self.engine.generate(rid, ids, params, text):
            out.extend(t for c in delta.completions for t in c.token_ids)
            yield delta
        self.calls[rid] = (ids, out)


def _run(engine: AsyncLLMEngine, params: RSAParams) -> tuple[Any, Recorder, RSARun]:
    tok = engine.engine.tokenizer
    assert tok is not None
    rec = Recorder(engine)

    def render(message: str) -> tuple[str, list[int]]:
        return message, tok.encode(message)

    run = RSARun(rec.generate, render, tok, params, "rsa", tok.encode(
        "</think>", add_special_tokens=False))
    return asyncio.run(run.run(PROBLEM, render(PROBLEM))), rec, run


SMALL = dict(n=4, k=2, t=2, tail_tokens=6, round_max_tokens=8, final_max_tokens=5, final_n=2,
             seed=7, return_population=True)


def test_rounds_tails_and_bounds(engine: AsyncLLMEngine) -> None:
    p = RSAParams(**SMALL)
    result, rec, run = _run(engine, p)
    assert [r.calls for r in result.rounds] == [4, 4, 2]
    assert len(result.answers) == 2
    tok = engine.engine.tokenizer
    assert tok is not None
    for r in (1, 2):
        previous = [rec.calls[f"rsa-r{r - 1}-{i}"][1] for i in range(4)]
        tails = [run._tail_text(ids) for ids in previous]
        assert all(len(tok.encode(t, add_special_tokens=False)) <= p.tail_tokens for t in tails)
        subsets = choose_subsets(p.seed, r, 4, p.effective_k, result.rounds[r].calls)
        for i, subset in enumerate(subsets):
            prompt = tok.decode(rec.calls[f"rsa-r{r}-{i}"][0])
            assert len(re.findall(r"Candidate \d+:", prompt)) == p.effective_k
            assert len(set(subset)) == p.effective_k  # distinct members of the last round
            for j, member in enumerate(subset):  # each block is that member's exact tail
                assert f"Candidate {j + 1}:\n{tails[member]}" in prompt
                whole = tok.decode(carry_tail(previous[member], [], p.carry, p.tail_tokens))
                assert whole.endswith(tails[member])  # the end of that member's output
    # The template's own tokens (numbering included), with an empty problem and empty traces.
    template = len(tok.encode(aggregation_prompt("", [""] * p.effective_k)))
    bound = max_context(p, len(tok.encode(PROBLEM)), template)
    assert all(r.max_context <= bound for r in result.rounds), (
        [r.max_context for r in result.rounds], bound)
    assert all(len(ids) <= p.round_max_tokens for _, ids in rec.calls.values())


def test_usage_sums_and_round_zero_reuses_the_prompt(engine: AsyncLLMEngine) -> None:
    result, rec, _ = _run(engine, RSAParams(**SMALL))
    assert result.prompt_tokens == sum(len(ids) for ids, _ in rec.calls.values())
    assert result.completion_tokens == sum(len(out) for _, out in rec.calls.values())
    tok = engine.engine.tokenizer
    assert tok is not None
    full_blocks = (len(tok.encode(PROBLEM)) - 1) // BLOCK
    assert result.rounds[0].cached_tokens >= 3 * full_blocks * BLOCK


def test_seeded_runs_repeat_and_differ_by_seed(engine: AsyncLLMEngine) -> None:
    a, rec_a, _ = _run(engine, RSAParams(**SMALL))
    b, _, _ = _run(engine, RSAParams(**SMALL))
    assert a.population == b.population and [o.outputs[0].text for o in a.answers] == [
        o.outputs[0].text for o in b.answers]
    assert len(set(a.population[0])) > 1  # the round-0 traces are not all the same
    c, rec_c, _ = _run(engine, RSAParams(**{**SMALL, "seed": 8}))
    assert a.population != c.population


def test_cancelling_frees_everything(engine: AsyncLLMEngine) -> None:
    tok = engine.engine.tokenizer
    assert tok is not None
    p = RSAParams(n=6, k=3, t=3, tail_tokens=8, round_max_tokens=40, final_max_tokens=40,
                  seed=1)
    run = RSARun(engine.generate, lambda m: (m, tok.encode(m)), tok, p, "gone")

    async def main() -> None:
        task = asyncio.create_task(run.run(PROBLEM, (PROBLEM, tok.encode(PROBLEM))))
        while run.calls_done < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            stats = await engine.run_on_engine(lambda e: e.stats())
            if stats["num_requests_running"] == stats["num_requests_waiting"] == 0:
                break
            await asyncio.sleep(0.02)
        assert stats["num_requests_running"] == stats["num_requests_waiting"] == 0
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
        assert not engine.engine.requests

    asyncio.run(main())


def test_reserved_slots_outlast_a_full_queue(engine: AsyncLLMEngine) -> None:
    """Between rounds, the run's calls have ended; whoever grabs every free slot then still
    cannot make the next round's calls fail: they use the run's reserved slots."""
    from zayaserve.replicas.engine.admission import EngineOverloadedError
    from zayaserve.replicas.rsa.events import RSADone, RSAJob, RSAProgress
    from zayaserve.replicas.rsa.serving import engine_rsa_events

    tok = engine.engine.tokenizer
    assert tok is not None
    ids = tok.encode(PROBLEM)
    job = RSAJob("queue", PROBLEM, PROBLEM, ids, RSAParams(
        n=3, k=2, t=2, tail_tokens=8, round_max_tokens=8, final_max_tokens=8, seed=1),
        chat=False)

    # What is tested here is the run's own slots, not the share runs may hold together:
    # let the grab below reserve the whole rest of the queue.
    engine._admission.max_held = engine.max_pending_requests

    async def main() -> tuple[RSADone, bool]:
        grabbed, refused, done = None, False, None
        async for event in engine_rsa_events(engine, tok, job):
            if isinstance(event, RSAProgress) and event.round == 1 and grabbed is None:
                free = (engine.max_pending_requests - engine.num_pending
                        - engine._admission.reserved)
                grabbed = engine.reserve(free)  # the queue is now full for anyone else
                try:
                    await anext(engine.generate("other", ids, SamplingParams(max_tokens=1)))
                except EngineOverloadedError:
                    refused = True
            if isinstance(event, RSADone):
                done = event
        assert grabbed is not None and done is not None
        grabbed.__exit__()
        return done, refused

    try:
        done, refused = asyncio.run(main())
    finally:
        engine._admission.max_held = engine.max_pending_requests // 2
    assert refused
    assert [r.calls for r in done.rounds] == [3, 3, 1]
    assert engine.num_pending == 0 and engine._admission.reserved == 0


def test_a_rounds_kv_is_freed_before_the_next_round(engine: AsyncLLMEngine) -> None:
    """When round r starts, nothing of round r-1 runs or holds a block (cached blocks are
    free: the prefix cache keeps them only until the space is needed)."""
    from zayaserve.replicas.rsa.events import RSAJob, RSAProgress
    from zayaserve.replicas.rsa.serving import engine_rsa_events

    tok = engine.engine.tokenizer
    assert tok is not None
    job = RSAJob("free", PROBLEM, PROBLEM, tok.encode(PROBLEM), RSAParams(
        n=3, k=2, t=3, tail_tokens=8, round_max_tokens=8, final_max_tokens=8, seed=2),
        chat=False)
    blocks = engine.engine.scheduler.blocks

    async def main() -> list[tuple[int, int, int]]:
        seen: list[tuple[int, int, int]] = []
        async for event in engine_rsa_events(engine, tok, job):
            if isinstance(event, RSAProgress) and event.calls_done == 3 * event.round:
                seen.append((event.round, engine.num_pending,
                             blocks.num_blocks - blocks.num_free))
        return seen

    starts = asyncio.run(main())
    assert [r for r, _, _ in starts] == [0, 1, 2, 3]
    assert all(pending == 0 and used == 0 for _, pending, used in starts), starts
