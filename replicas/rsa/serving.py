"""An RSA request served by one engine: the job's prompts rendered with the checkpoint's
tokenizer, its worst case checked before anything runs, and the run turned into a stream of
events (`rsa_events`), which is what an attention worker returns to the front end and what the
offline `LLM.rsa` consumes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass

from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.model.tokenizer import Tokenizer
from zayaserve.replicas.rsa.events import RSADone, RSAEvent, RSAJob
from zayaserve.replicas.rsa.params import call_counts, check_budget, max_context
from zayaserve.replicas.rsa.prompts import aggregation_prompt
from zayaserve.replicas.rsa.runner import Generate, Render, RSAResult, RSARun
from zayaserve.replicas.validation_errors import ParamError

# Tokens allowed per carried tail for re-tokenization at its edges (a tail's first and last
# tokens can merge differently with the text around it in the prompt).
_EDGE_TOKENS = 2


@dataclass(frozen=True, slots=True)
class RSALimits:
    """What one RSA request may cost (the server's `limits.max_rsa_*`)."""

    max_tokens: int = 16_000_000  # prompts and completions over all calls, worst case
    max_calls_per_round: int = 64  # rsa.n and rsa.final_n


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
                  emit: Callable[[RSAEvent], None] | None = None) -> RSAResult:
    """The job's whole run over `generate` (an engine's), events to `emit`."""
    run = RSARun(generate, renderer(tokenizer, job), tokenizer, job.params, job.request_id,
                 think_end_ids(tokenizer), job.cache_salt, emit)
    return await run.run(job.problem, (job.prompt_text or "", job.prompt_ids))


def done_event(result: RSAResult) -> RSADone:
    population = (None if result.population is None
                  else tuple(tuple(texts) for texts in result.population))
    return RSADone(tuple(result.rounds), population)


async def engine_rsa_events(engine: AsyncLLMEngine, tokenizer: Tokenizer, job: RSAJob,
                            trace_context: Mapping[str, str] | None = None,
                            ) -> AsyncGenerator[RSAEvent, None]:
    """`rsa_events` on an engine, with a round's worth of its queue reserved first: a full
    queue refuses the run (EngineOverloadedError) before any call, never halfway through."""
    with engine.reserve(max(call_counts(job.params))) as slots:
        def generate(rid: str, ids: list[int], params: SamplingParams,
                     text: str | None) -> AsyncGenerator[StepDelta, None]:
            return engine.generate(rid, ids, params, text, trace_context, slots)

        async with contextlib.aclosing(rsa_events(generate, tokenizer, job)) as events:
            async for event in events:
                yield event


async def rsa_events(generate: Generate, tokenizer: Tokenizer,
                     job: RSAJob) -> AsyncGenerator[RSAEvent, None]:
    """The run's events as they happen, `RSADone` last. Closing the generator early (the
    client left) cancels the run, which aborts every call still in the engine."""
    queue: asyncio.Queue[RSAEvent | None] = asyncio.Queue()
    task = asyncio.ensure_future(run_job(generate, tokenizer, job, queue.put_nowait))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (event := await queue.get()) is not None:
            yield event
        yield done_event(task.result())  # raises what the run raised
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
