"""The ingress's half of request migration (`cluster/frontend/migration.py`), one piece on its
own: `ClusterEngineClient` over a stand-in for Serve's handle whose streams come from a real
engine and whose "worker" dies after a given number of deltas (an error named as Ray's). The
client's stream must go on, exactly, within `migration_limit`; the multi-node proof (a real
node killed) is tests/test_migration_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from openai_helpers import make_engine_client

from zayaserve.cluster.frontend.engine_client import ClusterEngineClient, LocalEngineClient
from zayaserve.cluster.frontend.migration import MigrationCounts
from zayaserve.replicas.engine.async_engine import EngineDeadError, EngineOverloadedError
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import SamplingParams

PROMPT = [2, *range(40, 56)]
FULL = -1  # in a list of deaths: that submission finds every queue full


class ActorDiedError(Exception):
    """Named as Ray's: what a stream from a dead worker replica raises."""


class BackPressureError(Exception):
    """Named as Serve's: every replica's queue is full."""


class _Full:
    """A submission Serve refuses: its queues are full."""

    def __aiter__(self) -> _Full:
        return self

    async def __anext__(self) -> StepDelta:
        raise BackPressureError("max_queued_requests reached")

    def cancel(self) -> None:
        pass


class _Stream:
    def __init__(self, deltas: AsyncIterator[StepDelta], die_after: int | None) -> None:
        self.deltas, self.die_after, self.sent = deltas, die_after, 0

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> StepDelta:
        if self.die_after is not None and self.sent >= self.die_after:
            await self.deltas.aclose()  # type: ignore[attr-defined]
            raise ActorDiedError("the worker replica died")
        self.sent += 1
        return await self.deltas.__anext__()

    def cancel(self) -> None:
        asyncio.get_running_loop().create_task(self.deltas.aclose())  # type: ignore[attr-defined]


class _Workers:
    """Serve's handle, stood in: each `generate` call is the next worker's, the first ones
    dying after `deaths[i]` deltas."""

    def __init__(self, local: LocalEngineClient, deaths: list[int]) -> None:
        self.local, self.deaths = local, list(deaths)
        self.calls: list[tuple[SamplingParams, Any]] = []

    def options(self, stream: bool) -> _Workers:
        return self

    @property
    def generate(self) -> _Workers:
        return self

    def remote(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               prompt: Any, trace: Any, resume: Any) -> _Stream:
        self.calls.append((params, resume))
        if self.deaths and self.deaths[0] == FULL:
            self.deaths.pop(0)
            return _Full()  # type: ignore[return-value]
        engine = self.local.engine
        return _Stream(engine.generate(request_id, prompt_ids, params, prompt, trace,
                                       resume=resume),
                       self.deaths.pop(0) if self.deaths else None)


@pytest.fixture(scope="module")
def local(tiny_checkpoint: Path) -> LocalEngineClient:
    return make_engine_client(str(tiny_checkpoint))


def _client(local: LocalEngineClient, deaths: list[int], limit: int = 3
            ) -> tuple[ClusterEngineClient, _Workers]:
    workers = _Workers(local, deaths)
    return ClusterEngineClient(workers, None, local.tokenizer, "tiny", 512, limit), workers


def _collect(client: Any, params: SamplingParams) -> list[StepDelta]:
    async def run() -> list[StepDelta]:
        return [d async for d in client.generate("r", list(PROMPT), params)]
    return asyncio.run(run())


def _flat(deltas: list[StepDelta]) -> tuple[list[int], str, Any]:
    steps = [c for d in deltas for c in d.completions]
    return ([t for c in steps for t in c.token_ids], "".join(c.text for c in steps),
            steps[-1].finish_reason)


PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    "seeded": SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=40, ignore_eos=True,
                             stop=[" th"], presence_penalty=0.4),
}


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_streams_move_past_dead_workers_exactly(local: LocalEngineClient, kind: str) -> None:
    params = PARAMS[kind]
    want = _flat(_collect(_client(local, [])[0], params))
    client, workers = _client(local, [4, 0, 7])  # dies mid-stream, at once, mid-stream again
    got = _collect(client, params)
    assert _flat(got) == want
    # The prompt went out once, in the first delta; resumed streams' first deltas lose it.
    assert [d.prompt_token_ids is not None for d in got].count(True) == 1
    assert got[0].prompt_token_ids == tuple(PROMPT)
    assert [len(r.output_token_ids) if r else 0 for _, r in workers.calls] == [
        0, 4, 4, len(_flat(got[:11])[0])]
    assert (client.migrations.moved, client.migrations.resumed, client.migrations.failed) == (
        3, 1, 0)


def test_an_unseeded_request_is_seeded_once_and_resumes_with_that_seed(
        local: LocalEngineClient) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    client, workers = _client(local, [5])
    got = _flat(_collect(client, params))
    seeds = {p.seed for p, _ in workers.calls}
    assert len(workers.calls) == 2 and len(seeds) == 1 and None not in seeds
    [seed] = seeds
    again = _flat(_collect(_client(local, [])[0], SamplingParams(
        temperature=1.0, max_tokens=30, ignore_eos=True, seed=seed)))
    assert got == again


def test_a_moved_request_waits_out_full_queues_but_a_new_one_does_not(
        local: LocalEngineClient) -> None:
    params = PARAMS["greedy"]
    want = _flat(_collect(_client(local, [])[0], params))
    client, workers = _client(local, [5, FULL])  # the worker dies, then the others are full
    assert _flat(_collect(client, params)) == want
    assert len(workers.calls) == 3 and client.migrations.moved == 2
    client, workers = _client(local, [FULL])  # a first submission refused: a 429, as before
    with pytest.raises(EngineOverloadedError):
        _collect(client, params)
    assert len(workers.calls) == 1 and client.migrations.moved == 0


def test_migration_is_bounded_and_can_be_off(local: LocalEngineClient) -> None:
    params = PARAMS["greedy"]
    for limit, deaths, moved in [(1, [3, 2], 1), (0, [3], 0)]:
        client, workers = _client(local, deaths, limit)
        with pytest.raises(EngineDeadError, match="went away"):
            _collect(client, params)
        assert len(workers.calls) == moved + 1
        assert (client.migrations.moved, client.migrations.failed) == (moved, 1)
        assert client.in_flight == 0
    # n > 1 does not move: its completions share a parent the resume does not carry.
    client, workers = _client(local, [3])
    with pytest.raises(EngineDeadError):
        _collect(client, SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=20))
    assert len(workers.calls) == 1 and workers.calls[0][0].n == 2


class _Method:
    """A Serve handle's method, stood in: `.remote(...)` is awaitable."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    async def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class _Controller:
    """The placement controller's handle, stood in over a real ControllerState."""

    def __init__(self) -> None:
        from zayaserve.cluster.control.controller_state import ControllerState

        self.state = ControllerState(num_experts=8, num_shards=0, replication=1)
        self.reports: list[tuple[str, MigrationCounts]] = []
        self.report_ingress = _Method(self._report)
        self.stats = _Method(lambda: self.state.stats(0.0))

    def _report(self, replica: str, counts: MigrationCounts) -> None:
        self.reports.append((replica, counts))
        self.state.ingress.report(replica, counts)


def _migrations_on_metrics(stats: dict[str, Any]) -> dict[str, float]:
    return {s["outcome"]: s["value"] for s in stats["request_migrations_total"]}


def test_migration_counts_outlive_the_ingress_replica_that_counted_them(
        local: LocalEngineClient) -> None:
    """Each ingress replica reports its counts to the controller as they change; /metrics reads
    the controller's sum, so a restarted ingress (a new replica id, counting from 0) does not
    take the counter back down."""
    controller, params = _Controller(), PARAMS["greedy"]

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        first = ClusterEngineClient(_Workers(local, [4, 3]), controller, local.tokenizer,
                                    "tiny", 512, 3, replica_id="ingress-a")
        [d async for d in first.generate("r", list(PROMPT), params)]
        await asyncio.sleep(0)  # the background reports go out
        assert controller.reports[-1] == ("ingress-a", MigrationCounts(moved=2, resumed=1))
        before = await first.stats()
        # The replica dies; Serve starts another, which moves one stream and fails one.
        second = ClusterEngineClient(_Workers(local, [4, 2]), controller, local.tokenizer,
                                     "tiny", 512, 1, replica_id="ingress-b")
        with pytest.raises(EngineDeadError):
            [d async for d in second.generate("r", list(PROMPT), params)]
        return before, await second.stats()

    before, after = asyncio.run(run())
    assert _migrations_on_metrics(before) == {"moved": 2, "resumed": 1, "failed": 0}
    assert _migrations_on_metrics(after) == {"moved": 3, "resumed": 1, "failed": 1}
    # A report that arrives late, older than one already in, changes nothing.
    controller.state.ingress.report("ingress-a", MigrationCounts(moved=1))
    assert controller.state.ingress.summed() == MigrationCounts(moved=3, resumed=1, failed=1)


def test_ingress_totals_fold_the_oldest_replicas_without_losing_counts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from zayaserve.cluster.control import ingress_totals

    monkeypatch.setattr(ingress_totals, "MAX_REPLICAS", 3)
    totals = ingress_totals.IngressTotals()
    for i in range(10):
        totals.report(f"ingress-{i}", MigrationCounts(moved=i, failed=1))
    totals.report("ingress-9", MigrationCounts(moved=10, failed=1))  # the newest goes on
    assert totals.summed() == MigrationCounts(moved=46, failed=10)
    assert len(totals._latest) == 3
