"""RSA within its bounds and fair to everyone else (REST over one engine, i.e. one worker): an
aggregation template that repeats {traces} is a 400 naming rsa.aggregation_template; with four
maximal runs asked of one worker, runs hold at most half its queue (the rest 429) and an
ordinary request still gets 200; a worker refuses runs past max_concurrent_rsa_runs; a run past
its deadline ends with every call aborted; one API key may have max_rsa_runs_per_tenant runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai_helpers import Server
from test_grpc_api import wait_idle

from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.openai_api import build_openai_app
from zayaserve.replicas.engine.admission import EngineOverloadedError
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.rsa.events import RSAJob
from zayaserve.replicas.rsa.params import RSAParams
from zayaserve.replicas.rsa.serving import RSADeadlineError, RSALimits, engine_rsa_events

MODEL = "tiny"
PROBLEM = "What is 17 minus 9? Explain."
QUEUE = 32
LIMITS = RSALimits(max_tokens=2_000_000, max_calls_per_round=8, max_runs_per_tenant=1)
# A maximal run for these limits: n = max_calls_per_round, long enough to be in flight.
MAXIMAL = {"n": 8, "k": 2, "t": 2, "tail_tokens": 8, "round_max_tokens": 64,
           "final_max_tokens": 64, "seed": 3}
TENANT = "tenant-key-0042"


@pytest.fixture(scope="module")
def engine_client(tiny_checkpoint: Any) -> Iterator[LocalEngineClient]:
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), num_kv_blocks=2048))
    client = LocalEngineClient(AsyncLLMEngine(engine, max_pending_requests=QUEUE), MODEL)
    yield client
    client.engine.shutdown()


@pytest.fixture(scope="module")
def server(engine_client: LocalEngineClient) -> Iterator[Server]:
    s = Server(build_openai_app(engine_client, rsa_limits=LIMITS, api_keys=[TENANT]))
    yield s
    s.stop()


def _chat(server: Server, rsa: dict[str, Any], **extra: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=300,
                      headers={"Authorization": f"Bearer {TENANT}"},
                      json={"model": MODEL, "rsa": rsa, "messages": [
                          {"role": "user", "content": PROBLEM}], **extra})


def test_a_template_repeating_traces_is_refused(server: Server) -> None:
    reported = "{problem}" + "{traces}" * 5000  # 65 KB empty, 40 MB filled
    r = _chat(server, {**MAXIMAL, "k": 1, "aggregation_template": reported})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "rsa.aggregation_template", r.text
    for template in ("{problem}{traces}{traces}", "{traces} and {problem}, {problem}"):
        r = _chat(server, {**MAXIMAL, "aggregation_template": template})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "rsa.aggregation_template"
        assert "exactly once" in error["message"], error


def test_four_maximal_runs_leave_room_for_ordinary_requests(
        engine_client: LocalEngineClient) -> None:
    """Runs hold at most half the queue between them: of four maximal runs (8 slots each in a
    queue of 32), two are admitted and two refused, and an ordinary request gets in."""
    wait_idle(engine_client)
    # Four tenants' worth of runs: no API keys here, so no per-tenant cap interferes.
    open_server = Server(build_openai_app(engine_client, rsa_limits=LIMITS))
    statuses: list[int] = []
    started = threading.Barrier(5)

    def run() -> None:
        started.wait()
        statuses.append(httpx.post(open_server.url + "/v1/chat/completions", timeout=300, json={
            "model": MODEL, "rsa": MAXIMAL, "messages": [
                {"role": "user", "content": PROBLEM}]}).status_code)

    threads = [threading.Thread(target=run) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        started.wait()
        while engine_client.engine.num_pending == 0:  # the admitted runs are going
            pass
        ordinary = httpx.post(open_server.url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 4})
        busy = engine_client.engine.num_pending
        for t in threads:
            t.join()
    finally:
        open_server.stop()
    print(f"\n[rsa fairness] four maximal runs: {sorted(statuses)}; an ordinary request "
          f"while {busy} calls were in flight: {ordinary.status_code}")
    assert ordinary.status_code == 200, ordinary.text
    assert sorted(statuses) == [200, 200, 429, 429], statuses


def _job(rid: str, **fields: Any) -> RSAJob:
    return RSAJob(rid, PROBLEM, PROBLEM, list(range(20, 40)), RSAParams(**{
        **MAXIMAL, **fields}), chat=False)


def test_a_worker_caps_its_runs_and_a_run_keeps_its_deadline(
        engine_client: LocalEngineClient) -> None:
    engine, tok = engine_client.engine, engine_client.tokenizer
    wait_idle(engine_client)

    async def main() -> None:
        one = RSALimits(max_concurrent_runs=1)
        first = engine_rsa_events(engine, tok, _job("cap-1"), limits=one)
        await anext(first)  # running
        with pytest.raises(EngineOverloadedError, match="max_concurrent_rsa_runs=1"):
            await anext(engine_rsa_events(engine, tok, _job("cap-2"), limits=one))
        await first.aclose()
        late = engine_rsa_events(engine, tok, _job("late", round_max_tokens=400, t=3),
                                 limits=RSALimits(timeout_s=0.5))
        with pytest.raises(RSADeadlineError, match="rsa_timeout_s"):
            async for _ in late:
                pass

    asyncio.run(main())
    wait_idle(engine_client)  # every call of both runs was aborted: nothing runs, no block held
    assert engine._admission.held == 0


def test_one_api_key_has_its_share_of_runs(server: Server) -> None:
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=300,
                      headers={"Authorization": f"Bearer {TENANT}"},
                      json={"model": MODEL, "stream": True,
                            "rsa": {**MAXIMAL, "t": 3, "round_max_tokens": 400},
                            "messages": [{"role": "user", "content": PROBLEM}]}) as first:
        assert first.status_code == 200
        lines = first.iter_lines()  # kept: a dropped line iterator closes the response
        next(line for line in lines if line)  # the run is going
        second = _chat(server, MAXIMAL)
        assert second.status_code == 429, second.text
        assert "max_rsa_runs_per_tenant" in second.json()["error"]["message"]
    r = _chat(server, {**MAXIMAL, "round_max_tokens": 4, "final_max_tokens": 4})
    assert r.status_code == 200, r.text[:300]
