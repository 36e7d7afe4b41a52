"""An RSA request served by one engine: the job's prompts rendered with the checkpoint's
tokenizer, its worst case checked before anything runs, and the run turned into a stream of
events (`rsa_events`), which is what an attention worker returns to the front end and what the
offline `LLM.rsa` consumes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from zayaserve.replicas.engine.admission import EngineOverloadedError
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine, StreamStalledError
from zayaserve.replicas.engine.config import RequestLimits
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.model.tokenizer import Tokenizer
from zayaserve.replicas.rsa.events import RSADone, RSAEvent, RSAJob
from zayaserve.replicas.rsa.params import call_counts, check_budget, max_context
from zayaserve.replicas.rsa.prompts import aggregation_prompt
from zayaserve.replicas.rsa.rounds import Generate, Render, RSAResult, RSARun
from zayaserve.replicas.validation_errors import ParamError

# Tokens allowed per carried tail for re-tokenization at its edges (a tail's first and last
# tokens can merge differently with the text around it in the prompt).
_EDGE_TOKENS = 2


@dataclass(frozen=True, slots=True)
class RSALimits:
    """What one RSA request may cost (the server's `limits.max_rsa_*`), and how many may run."""

    max_tokens: int = 16_000_000  # prompts and completions over all calls, worst case
    max_calls_per_round: int = 64  # rsa.n and rsa.final_n
    max_concurrent_runs: int = 4  # runs one engine (attention worker) holds at once
    timeout_s: float = 1800.0  # a run's deadline, from its start
    max_runs_per_tenant: int = 2  # runs one API key has at once, per front end


def rsa_limits(limits: RequestLimits) -> RSALimits:
    """The RSA part of an engine's request limits."""
    return RSALimits(limits.max_rsa_tokens, limits.max_rsa_calls_per_round,
                     limits.max_concurrent_rsa_runs, limits.rsa_timeout_s,
                     limits.max_rsa_runs_per_tenant)


class RSAGate:
    """An engine's RSA runs and their calls in flight (the request router counts a run by its
    calls, not as the one request Serve sees)."""

    def __init__(self) -> None:
        self.runs = 0
        self.calls = 0

    @contextlib.contextmanager
    def enter(self, limit: int) -> Iterator[None]:
        if self.runs >= limit:
            raise EngineOverloadedError(f"{self.runs} RSA runs on this worker already "
                                        f"(max_concurrent_rsa_runs={limit})")
        self.runs += 1
        try:
            yield
        finally:
            self.runs -= 1


_GATES: WeakKeyDictionary[AsyncLLMEngine, RSAGate] = WeakKeyDictionary()


def rsa_gate(engine: AsyncLLMEngine) -> RSAGate:
    """The engine's gate (one per engine: its runs share the engine's queue)."""
    return _GATES.setdefault(engine, RSAGate())


class RSADeadlineError(StreamStalledError):
    """A run past its deadline (limits.rsa_timeout_s): every call is aborted."""


def renderer(tokenizer: Tokenizer, job: RSAJob) -> Render:
    """An aggregation message -> (prompt text, ids): the conversation's history and one user
    message, through the chat template; or the message's own encoding for a plain prompt."""
    if not job.chat:
        return lambda message: (message, tokenizer.encode(message))

    def render(message: str) -> tuple[str, list[int]]:
        conversation = [*job.history, {"role": "user", "content": message}]
        return tokenizer.render_chat(conversation, add_generation_prompt=True,
                                     **job.template_kwargs)
    return render


def think_end_ids(tokenizer: Tokenizer) -> list[int]:
    special = tokenizer.token_to_id("</think>")
    return [special] if special is not None else tokenizer.encode("</think>",
                                                                   add_special_tokens=False)


def template_tokens(tokenizer: Tokenizer, job: RSAJob) -> int:
    """What an aggregation prompt holds beyond round 0's prompt, the tails aside: rendered with
    empty tails, less the prompt, plus an allowance for each tail's edges."""
    p = job.params
    empty = renderer(tokenizer, job)(aggregation_prompt(
        job.problem, [""] * p.effective_k, p.aggregation_template))[1]
    return max(0, len(empty) - len(job.prompt_ids)) + _EDGE_TOKENS * p.effective_k


def preflight(tokenizer: Tokenizer, job: RSAJob, limits: RSALimits, max_model_len: int) -> int:
    """Refuses (ParamError naming the field) a run that could exceed the server's limits;
    returns the bound every call's prompt + completion stays within."""
    for name in ("n", "final_n"):
        value = getattr(job.params, name)
        if value > limits.max_calls_per_round:
            raise ParamError(f"rsa.{name}", f"rsa.{name}: at most {limits.max_calls_per_round} "
                             f"calls per round on this server, got {value}")
    extra = template_tokens(tokenizer, job)
    check_budget(job.params, len(job.prompt_ids), extra, limits.max_tokens, max_model_len)
    return max_context(job.params, len(job.prompt_ids), extra)


async def run_job(generate: Generate, tokenizer: Tokenizer, job: RSAJob,
                  emit: Callable[[RSAEvent], None] | None = None,
                  bound: int | None = None) -> RSAResult:
    """The job's whole run over `generate` (an engine's), events to `emit`; with `bound`,
    every aggregation prompt is checked against it before it runs."""
    run = RSARun(generate, renderer(tokenizer, job), tokenizer, job.params, job.request_id,
                 think_end_ids(tokenizer), job.cache_salt, emit, bound)
    return await run.run(job.problem, (job.prompt_text or "", job.prompt_ids))


def done_event(result: RSAResult) -> RSADone:
    population = (None if result.population is None
                  else tuple(tuple(texts) for texts in result.population))
    return RSADone(tuple(result.rounds), population)


async def engine_rsa_events(engine: AsyncLLMEngine, tokenizer: Tokenizer, job: RSAJob,
                            trace_context: Mapping[str, str] | None = None,
                            limits: RSALimits | None = None,
                            ) -> AsyncGenerator[RSAEvent, None]:
    """`rsa_events` on an engine, with a round's worth of its queue reserved first: a full
    queue (or a worker already running `max_concurrent_runs`) refuses the run
    (EngineOverloadedError) before any call, never halfway through; past `timeout_s` it ends
    with RSADeadlineError, every call aborted."""
    limits = limits or RSALimits()
    gate = rsa_gate(engine)
    bound = await asyncio.to_thread(
        lambda: max_context(job.params, len(job.prompt_ids), template_tokens(tokenizer, job)))
    with gate.enter(limits.max_concurrent_runs), \
            engine.reserve(max(call_counts(job.params))) as slots:
        async def generate(rid: str, ids: list[int], params: SamplingParams,
                           text: str | None) -> AsyncGenerator[StepDelta, None]:
            gate.calls += 1
            try:
                async with contextlib.aclosing(engine.generate(
                        rid, ids, params, text, trace_context, slots)) as deltas:
                    async for delta in deltas:
                        yield delta
            finally:
                gate.calls -= 1

        async with contextlib.aclosing(rsa_events(generate, tokenizer, job, limits.timeout_s,
                                                  bound)) as events:
            async for event in events:
                yield event


async def rsa_events(generate: Generate, tokenizer: Tokenizer, job: RSAJob,
                     timeout_s: float | None = None,
                     bound: int | None = None) -> AsyncGenerator[RSAEvent, None]:
    """The run's events as they happen, `RSADone` last. Closing the generator early (the
    client left) cancels the run, which aborts every call still in the engine; so does its
    deadline (`timeout_s` after the start), which then raises RSADeadlineError."""
    queue: asyncio.Queue[RSAEvent | None] = asyncio.Queue()
    task = asyncio.ensure_future(run_job(generate, tokenizer, job, queue.put_nowait, bound))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    expired = False

    def expire() -> None:
        nonlocal expired
        if not task.done():
            expired = True
            task.cancel()  # aborts every call; the done callback ends the loop below
    timer = (None if timeout_s is None
             else asyncio.get_running_loop().call_later(timeout_s, expire))
    try:
        while (event := await queue.get()) is not None:
            yield event
        if expired:
            raise RSADeadlineError(f"rsa: the run took longer than its {timeout_s:g} s "
                                   f"(limits.rsa_timeout_s); every call was aborted")
        yield done_event(task.result())  # raises what the run raised
    finally:
        if timer is not None:
            timer.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
