"""Structured-output compiles: once per request when it arrives, never on the engine's step
thread, within `limits.max_grammar_compile_s` (a slower one is a 400 while other requests keep
decoding), with at most `limits.max_concurrent_grammar_compiles` workers (429 when none frees)
and one compile for identical constraints in flight."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xgrammar  # noqa: F401  (the `structured` extra: tests/run.sh installs it)

from zayaserve.replicas.engine.async_engine import AsyncLLMEngine, EngineOverloadedError
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.grammar import CompileOnEngineThreadError, no_compiles
from zayaserve.replicas.engine.grammar_compile import CompilePool
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.structured import MAX_CONSTRAINT_CHARS, StructuredOutputsParams
from zayaserve.replicas.validation_errors import ParamError

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["ok", "n"], "additionalProperties": False}
REGEX = "[a-z]{3,8}-[0-9]{2}"
COMPILE_METHODS = ("compile_grammar", "compile_json_schema", "compile_regex",
                   "compile_builtin_json_grammar", "compile_lark", "compile_structural_tag")


def slow_grammar(n: int = 250) -> str:
    """A chain of n rules, each an optional character then the next rule: 5 KB of EBNF whose
    xgrammar compile grows about as n^3 (tiny checkpoint's 512-token vocabulary, this repo's
    2-core dev machine: n=200 2.2 s, 250 3.6 s, 300 8.1 s)."""
    rules = "\n".join(f"r{i} ::= [a-z]? r{i + 1}" for i in range(n))
    return f'root ::= r0\n{rules}\nr{n} ::= "."'


class CompileCounter:
    """Counts the xgrammar compiler's compiles by thread name."""

    def __init__(self, compiler: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: list[str] = []
        for name in COMPILE_METHODS:
            monkeypatch.setattr(compiler, name, self._counting(getattr(compiler, name)))

    def _counting(self, method: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.threads.append(threading.current_thread().name)
            return method(*args, **kwargs)
        return counted


# ---- the request holds its compiled grammar: the step never compiles ---------------------


def test_steps_never_compile_even_when_the_cache_dropped_the_grammar(
        tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """n > 1 children and preempted sequences get their matchers from the grammar their
    request holds, though xgrammar's cache was cleared after the requests arrived."""
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), block_size=4, num_kv_blocks=12,
                                    max_num_seqs=4))
    params = SamplingParams(temperature=1.0, seed=11, n=2, max_tokens=80, structured_outputs={
        "json": SCHEMA, "disable_any_whitespace": True})
    prompts = [[2, 40, 41, 42], [2, 7, 8], [2, 100, 200, 300, 400, 500], [2, 9]]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    compiler = engine.grammars.compiler().compiler
    compiler.clear_cache()
    assert compiler.get_cache_size_bytes() == 0
    counter = CompileCounter(compiler, monkeypatch)
    texts: dict[tuple[str, int], str] = {}
    ends: dict[tuple[str, int], str | None] = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for c in delta.completions:
                key = (delta.request_id, c.index)
                texts[key] = texts.get(key, "") + c.text
                ends[key] = c.finish_reason
    assert counter.threads == []
    assert engine.scheduler.num_preemptions > 0 and not engine.request_grammars
    assert len(texts) == 8 and set(ends.values()) == {"stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_compile_where_compiles_are_forbidden_raises(tiny_checkpoint: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint)))
    spec = StructuredOutputsParams(regex="[0-9]+")
    with no_compiles(), pytest.raises(CompileOnEngineThreadError):
        engine.grammars.compile(spec)
    with no_compiles(), pytest.raises(CompileOnEngineThreadError):
        engine.grammars.compiler().compile(spec)
    grammar = engine.grammars.compile(spec)  # allowed again outside the block
    assert grammar is not None and grammar.spec == spec
    with pytest.raises(ValueError, match="another constraint"):
        engine.add_request("x", [2, 3], SamplingParams(structured_outputs={"regex": "a"}),
                           grammar=grammar)
    eng = AsyncLLMEngine(engine)
    try:  # the async engine's loop thread never compiles, not even between steps
        with pytest.raises(CompileOnEngineThreadError):
            asyncio.run(eng.run_on_engine(lambda e: e.grammars.compile(spec)))
    finally:
        eng.shutdown()


# ---- the compile pool: time limit, overload, one compile per constraint -----------------


@pytest.fixture
def blocked_pool() -> Iterator[tuple[CompilePool, threading.Event, list[str]]]:
    """A one-worker pool with a 0.3 s limit whose compiles wait for the event."""
    release, calls = threading.Event(), []

    def compile_fn(spec: StructuredOutputsParams) -> str:
        calls.append(spec.regex or "")
        if spec.regex == "bad":
            raise ParamError("structured_outputs.regex", "cannot compile")
        assert release.wait(30)
        return f"compiled {spec.regex}"

    pool = CompilePool(compile_fn, max_workers=1, limit_s=0.3)
    yield pool, release, calls
    release.set()


def _drain(pool: CompilePool, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while pool.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.in_flight == 0


def test_slow_compile_is_a_400_and_a_busy_pool_a_429(
        blocked_pool: tuple[CompilePool, threading.Event, list[str]]) -> None:
    pool, release, calls = blocked_pool
    slow, other = StructuredOutputsParams(regex="slow"), StructuredOutputsParams(regex="other")
    t0 = time.monotonic()
    with pytest.raises(ParamError, match=r"exceeded the 0\.3 s limit") as err:
        pool.compile(slow)
    assert err.value.param == "structured_outputs"
    print(f"400 after {time.monotonic() - t0:.2f} s")
    with pytest.raises(EngineOverloadedError, match="max_concurrent_grammar_compiles"):
        pool.compile(other)  # the abandoned compile still holds the only worker
    release.set()
    _drain(pool)
    assert calls == ["slow"]  # the queued compile nobody waits for any more never ran
    assert pool.compile(other).compiled == "compiled other"
    with pytest.raises(ParamError, match="cannot compile"):
        pool.compile(StructuredOutputsParams(regex="bad"))


def test_identical_constraints_share_one_compile(
        blocked_pool: tuple[CompilePool, threading.Event, list[str]]) -> None:
    pool, release, calls = blocked_pool
    pool.limit_s = 10
    spec = StructuredOutputsParams(regex="same")

    async def main() -> list[Any]:
        waits = [asyncio.create_task(pool.compile_async(StructuredOutputsParams(regex="same")))
                 for _ in range(3)]
        sync = asyncio.get_running_loop().run_in_executor(None, pool.compile, spec)
        await asyncio.sleep(0.2)
        release.set()
        return [g.compiled for g in await asyncio.gather(*waits, sync)]

    assert asyncio.run(main()) == ["compiled same"] * 4
    assert calls == ["same"]
    _drain(pool)


def test_async_waits_are_bounded_too(
        blocked_pool: tuple[CompilePool, threading.Event, list[str]]) -> None:
    pool, release, calls = blocked_pool

    async def main() -> None:
        with pytest.raises(ParamError, match="max_grammar_compile_s"):
            await pool.compile_async(StructuredOutputsParams(regex="slow"))
        with pytest.raises(EngineOverloadedError):
            await pool.compile_async(StructuredOutputsParams(regex="other"))

    asyncio.run(main())
    release.set()
    _drain(pool)
    assert calls == ["slow"]


def test_the_limits_are_validated() -> None:
    with pytest.raises(ValueError, match=r"limits\.max_grammar_compile_s"):
        EngineConfig.create(model="ckpt", limits={"max_grammar_compile_s": 0})
    with pytest.raises(ValueError, match=r"limits\.max_concurrent_grammar_compiles"):
        EngineConfig.create(model="ckpt", limits={"max_concurrent_grammar_compiles": 0})


# ---- the case: a slow grammar on a serving engine --------------------------------


def test_a_slow_grammar_gets_its_400_while_other_streams_keep_decoding(
        tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grammar = slow_grammar()
    assert len(grammar) < MAX_CONSTRAINT_CHARS
    limit_s, tokens = 1.0, 200
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint),
                                    limits={"max_grammar_compile_s": limit_s}))
    eng = AsyncLLMEngine(engine)
    compiler = engine.grammars.compiler().compiler
    counter = CompileCounter(compiler, monkeypatch)
    add_request = engine.add_request

    def add_after_eviction(*args: Any, **kwargs: Any) -> None:  # on the engine thread
        compiler.clear_cache()  # another request's compiles evicted ours since it arrived
        add_request(*args, **kwargs)

    monkeypatch.setattr(engine, "add_request", add_after_eviction)
    plain = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    regex = SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=40,
                           structured_outputs={"regex": REGEX})
    arrivals: dict[str, list[tuple[float, int]]] = {}

    async def stream(label: str, prompt: list[int], params: SamplingParams) -> list[str]:
        got, texts = arrivals.setdefault(label, []), [""] * params.n
        async for delta in eng.generate(label, prompt, params):
            got.append((time.perf_counter(), sum(len(c.token_ids) for c in delta.completions)))
            for c in delta.completions:
                texts[c.index] += c.text
        return texts

    async def slow_request() -> tuple[BaseException, float, float]:
        while sum(n for _, n in arrivals.get("s0", [])) < 10:  # the streams are decoding
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        params = SamplingParams(max_tokens=20, structured_outputs={"grammar": grammar})
        with pytest.raises(ParamError) as err:
            async for _ in eng.generate("slow", [2, 5, 6], params):
                pass
        return err.value, t0, time.perf_counter() - t0

    async def main() -> tuple[list[str], tuple[BaseException, float, float]]:
        streams = [stream(f"s{i}", [2, 40 + i, 41, 42], plain) for i in range(3)]
        regex_texts = asyncio.ensure_future(stream("regex", [2, 9, 10], regex))
        refused = asyncio.ensure_future(slow_request())
        await asyncio.gather(*streams, regex_texts, refused)
        return regex_texts.result(), refused.result()

    try:
        regex_texts, (err, t0, refused_s) = asyncio.run(main())
        # The abandoned compile ends in the background (at a low priority: slowly on a busy
        # machine).
        _drain(engine.grammars.compiles, timeout_s=300)
        compile_s = time.perf_counter() - t0
    finally:
        eng.shutdown()
    assert isinstance(err, ParamError) and err.param == "structured_outputs"
    assert "max_grammar_compile_s" in str(err) and "exceeded" in str(err)
    for i in range(3):
        assert sum(n for _, n in arrivals[f"s{i}"]) == tokens
    assert len(regex_texts) == 2 and all(re.fullmatch(REGEX, t) for t in regex_texts), regex_texts
    assert "zayaserve-engine" not in counter.threads  # every compile ran off the engine thread
    assert counter.threads.count("zayaserve-grammar-0") + counter.threads.count(
        "zayaserve-grammar-1") == len(counter.threads) == 2  # the regex, the slow grammar
    gaps = [(b - a, a, b) for i in range(3) for (a, _), (b, _) in zip(
        arrivals[f"s{i}"], arrivals[f"s{i}"][1:], strict=False)]
    before = [g for g, _, b in gaps if b <= t0]
    during = [g for g, a, b in gaps if b > t0 and a < t0 + compile_s]
    print(f"\nslow grammar ({len(grammar)} chars of EBNF): compile {compile_s:.2f} s, its 400 "
          f"after {refused_s:.2f} s (limit {limit_s:g} s); inter-token gaps of the 3 streams: "
          f"{_summary(during)} while it compiled, {_summary(before)} before it arrived")


def _summary(gaps: list[float]) -> str:
    if not gaps:
        return "none"
    ordered = sorted(gaps)
    return (f"max {ordered[-1] * 1e3:.1f} ms (median {ordered[len(gaps) // 2] * 1e3:.1f} ms, "
            f"{len(gaps)} gaps)")
