"""Whether a chat request asks for an RSA run (its `rsa` object or Zyphra's flat rsa_* fields,
read on every chat request, so kept apart from the RSA handlers), and what REST and gRPC share
once a run is going: collecting its answers whole, recording it in the request's metrics, and
counting each tenant's runs in flight."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from weakref import WeakKeyDictionary

from zayaserve.cluster.frontend.frontend_errors import (
    InvalidRequestError,
    OverloadedError,
    UnavailableError,
    as_frontend_error,
)
from zayaserve.cluster.frontend.openai_chat_protocol import ChatCompletionRequest
from zayaserve.cluster.frontend.request_tracker import RequestTracker
from zayaserve.replicas.engine.outputs import CompletionOutput, RequestOutputBuilder
from zayaserve.replicas.rsa.events import RSAAnswerDelta, RSADone, RSAEvent, RSAJob
from zayaserve.replicas.rsa.params import FLAT_KEYS, RSAParams


def rsa_params_of(body: ChatCompletionRequest) -> RSAParams | None:
    """The run a chat request asks for (the `rsa` object or the flat aliases), or None."""
    try:
        flat = RSAParams.from_flat(body.model_extra or {})
    except ValueError as err:
        raise as_frontend_error(err) from None
    if flat is not None and body.rsa is not None:
        raise InvalidRequestError("rsa: give the rsa object or the flat rsa_* fields, not both",
                                  "rsa")
    return body.rsa or flat


def flat_renames(body: ChatCompletionRequest) -> dict[str, str]:
    """rsa.<field> -> the flat key the client used for it, so errors speak its terms."""
    return {f"rsa.{FLAT_KEYS[key]}": key for key in (body.model_extra or {})
            if key in FLAT_KEYS}


def unfinished() -> UnavailableError:
    return UnavailableError("the engine ended an RSA run without finishing it")


async def collect_run(events: AsyncIterator[RSAEvent], job: RSAJob, tracker: RequestTracker
                      ) -> tuple[list[CompletionOutput], RSADone]:
    """A run's answers whole (in choice order) and its figures, for a non-streaming reply;
    the answers' tokens are timed as they arrive and the run recorded at its end."""
    builders: dict[int, RequestOutputBuilder] = {}
    async with contextlib.aclosing(events) as stream:  # type: ignore[type-var]
        async for event in stream:
            if isinstance(event, RSAAnswerDelta):
                tracker.on_delta(event.index, event.delta)
                builders.setdefault(event.index, RequestOutputBuilder(
                    event.delta.request_id, None)).add(event.delta)
            elif isinstance(event, RSADone):
                record_run(tracker, job, event)
                return [builders[i].output.outputs[0] for i in sorted(builders)], event
    raise unfinished()


def record_run(tracker: RequestTracker, job: RSAJob, done: RSADone) -> None:
    """The run's prompts and its middle rounds' tokens in the request's metrics (the final
    round's tokens were timed as they streamed), and its shape on the request's span."""
    tracker.on_prompt(done.prompt_tokens)
    tracker.on_untimed_tokens(done.completion_tokens - done.rounds[-1].completion_tokens)
    p = job.params
    tracker.annotate({"zayaserve.rsa.n": p.n, "zayaserve.rsa.k": p.effective_k,
                      "zayaserve.rsa.t": p.t, "zayaserve.rsa.tail_tokens": p.tail_tokens,
                      "zayaserve.rsa.calls": done.calls,
                      "zayaserve.rsa.cached_tokens": done.cached_tokens,
                      "zayaserve.rsa.max_context": done.max_context})


# RSA runs in flight per tenant, per engine client (one per front-end process: REST and gRPC
# share it).
_TENANT_RUNS: WeakKeyDictionary[object, Counter[str]] = WeakKeyDictionary()


def tenant_limited(client: object, tenant: str | None, limit: int,
                   events: AsyncIterator[RSAEvent]) -> AsyncIterator[RSAEvent]:
    """`events`, counted as one of the tenant's runs until it ends or is closed; a tenant
    already at `limit` runs is refused (429) before the run starts. Without API keys (tenant
    None) nothing is counted."""
    if tenant is None:
        return events
    runs = _TENANT_RUNS.setdefault(client, Counter())
    if runs[tenant] >= limit:
        raise OverloadedError(f"rsa: this API key already has {runs[tenant]} RSA runs going "
                              f"(max_rsa_runs_per_tenant={limit}); retry when one ends",
                              "rsa", retry_after_s=5)
    runs[tenant] += 1

    async def counted() -> AsyncIterator[RSAEvent]:
        try:
            async with contextlib.aclosing(events) as stream:  # type: ignore[type-var]
                async for event in stream:
                    yield event
        finally:
            runs[tenant] -= 1
    return counted()
