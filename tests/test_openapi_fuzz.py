"""Fuzzes the OpenAI-compatible REST API from its own OpenAPI schema with schemathesis: requests
generated from the declared bodies, valid and invalid alike, each get a documented status, never
a 5xx, with a body that matches the schema (JSON, or every server-sent event of a stream), and
a request the schema calls invalid is refused with a 4xx. A real uvicorn server over
LocalEngineClient on the tiny checkpoint answers; the number of cases is bounded so the run
stays short."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openai_helpers import MODEL, Server, make_engine_client, wait_idle
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from zayaserve.cluster.frontend.engine_client import LocalEngineClient
from zayaserve.cluster.frontend.openai_api import build_openai_app

pytestmark = pytest.mark.slow

# Generation itself is tested elsewhere: a few tokens per choice keep every case fast.
MAX_TOKENS = 3
# Random cases per operation (valid and invalid), after schemathesis's deterministic boundary
# cases (some 500 per POST operation); GET operations without parameters have nothing to vary.
MAX_EXAMPLES = 100
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
ROLES = ("user", "system", "assistant")  # what the tiny checkpoint's chat template renders

stats: dict[str, Any] = {"cases": 0, "by_status": {}, "started": 0.0}


@pytest.fixture(scope="module")
def fuzz_engine_client(tiny_checkpoint: Any) -> Iterator[LocalEngineClient]:
    b = make_engine_client(str(tiny_checkpoint))
    yield b
    b.engine.shutdown()


@pytest.fixture(scope="module")
def fuzz_server(fuzz_engine_client: LocalEngineClient) -> Iterator[Server]:
    s = Server(build_openai_app(fuzz_engine_client, served_model_names=[MODEL]))
    stats["started"] = time.monotonic()
    yield s
    s.stop()


def _openapi_document() -> dict[str, Any]:
    """The app's schema, which depends on no engine: built here, at collection time, since
    schemathesis parametrizes the test with one item per operation (its fixture-based lazy
    loading does not work with pytest 9). The served one is checked equal below."""
    return build_openai_app(cast(Any, _NoEngineClient()), served_model_names=[MODEL]).openapi()


class _NoEngineClient:
    model_name = MODEL


# Read every event of a stream (schemathesis stops at 20 by default), to see how it ends.
schema = schemathesis.openapi.from_dict(
    _openapi_document(), config=schemathesis.Config.from_dict({"max-stream-events": 100_000}))


def test_schema_declares_bodies_and_answers(fuzz_server: Server) -> None:
    """The routes read their own bodies, so FastAPI alone would document none: without the
    declared request bodies there would be nothing to fuzz."""
    doc = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    assert doc == json.loads(json.dumps(_openapi_document()))
    for path in GENERATION_PATHS:
        op = doc["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        # Unknown fields are ignored (vLLM's way), except features not honoured here.
        assert body["additionalProperties"] is True and body["required"], path
        assert "functions" in body["propertyNames"]["not"]["enum"], path
        assert {"200", "400", "404", "500"} <= set(op["responses"]), path
        assert set(op["responses"]["200"]["content"]) == {"application/json",
                                                          "text/event-stream"}, path
        error = op["responses"]["400"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorResponse"}, path
    assert "application/json" not in doc["paths"]["/health"]["get"]["responses"]["200"].get(
        "content", {})


def _prepare(case: Any) -> None:
    """Caps the tokens to generate (unset or null, chat generates up to the context length),
    touching only absent, null or well-typed counts, so an invalid case stays invalid. In valid
    chat cases, half the roles become ones the chat template knows (a random string never is,
    so the template would refuse them all and nothing deeper would be reached)."""
    body = case.body
    if case.path not in GENERATION_PATHS or not isinstance(body, dict):
        return
    keys = ["max_tokens"] if case.path == "/v1/completions" else ["max_tokens",
                                                                  "max_completion_tokens"]
    if all(body.get(k) is None for k in keys):
        body[keys[-1]] = MAX_TOKENS
    for k in keys:
        if type(body.get(k)) is int and body[k] > MAX_TOKENS:
            body[k] = MAX_TOKENS
    if case.meta is not None and case.meta.generation.mode.is_positive:
        for message in body.get("messages", []):
            role = message["role"]
            if role not in ROLES and len(role) % 2 == 0:
                message["role"] = ROLES[len(role) // 2 % len(ROLES)]


def stream_is_framed(ctx: Any, response: Any, case: Any) -> None:
    """A 200 stream is data-only events ending in exactly one `data: [DONE]` (the schema checks
    each event, not their order), and holds no error: every request check comes before the 200,
    and a healthy server has nothing else to report in-band."""
    if response.status_code != 200 or not response.headers.get(
            "content-type", [""])[0].startswith("text/event-stream"):
        return
    assert not response.stream_cut_short
    events = [e for e in response.content.decode().split("\n\n") if e]
    assert events and all(e.startswith("data: ") for e in events), events[:3]
    data = [e.removeprefix("data: ") for e in events]
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1, data[-3:]
    for payload in map(json.loads, data[:-1]):
        assert "error" not in payload, payload


def error_names_the_field(ctx: Any, response: Any, case: Any) -> None:
    """A 400 for a JSON object body says which field is wrong (OpenAI's `param`)."""
    if response.status_code == 400 and isinstance(case.body, dict):
        error = json.loads(response.content)["error"]
        assert error["param"] is not None and error["message"], error


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          stream_is_framed, error_names_the_field]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: Any, fuzz_server: Server) -> None:
    _prepare(case)
    response = case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=60)
    stats["cases"] += 1
    stats["by_status"][response.status_code] = stats["by_status"].get(response.status_code, 0) + 1


def test_fuzzing_left_the_engine_idle(fuzz_engine_client: LocalEngineClient) -> None:
    """Every fuzzed request, refused, finished or abandoned, has given back its KV blocks."""
    wait_idle(fuzz_engine_client)
    print(f"\nfuzzed {stats['cases']} cases in {time.monotonic() - stats['started']:.0f} s, "
          f"by status: {dict(sorted(stats['by_status'].items()))}")
