"""AsyncLLMEngine: streaming equals the offline engine, cancel frees blocks, overload is bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from zayaserve import LLM, SamplingParams
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine, EngineOverloadedError
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.engine.outputs import RequestOutputBuilder

PROMPTS = [[2, 40, 41, 42], [2, 7, 8], [2, 100, 200, 300, 400, 500]]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    eng = AsyncLLMEngine(LLMEngine(EngineConfig(model=str(tiny_checkpoint))),
                         max_pending_requests=4)
    yield eng
    eng.shutdown()


def _all_free(eng: AsyncLLMEngine) -> bool:
    s = eng.engine.scheduler
    return (not s.running and not s.waiting and s.blocks.num_free == s.blocks.num_blocks
            and s.slots.num_free == s.slots.num_slots)


def test_concurrent_streams_equal_offline(engine: AsyncLLMEngine, tiny_checkpoint: Path):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(model=str(tiny_checkpoint)).generate(
        [{"prompt_token_ids": p} for p in PROMPTS], params)]

    async def one(i: int) -> tuple[list[int], int]:
        updates, builder = 0, RequestOutputBuilder(f"r{i}", None)
        async for delta in engine.generate(f"r{i}", PROMPTS[i], params):
            updates, last = updates + 1, builder.add(delta)
        assert last.finished
        return last.outputs[0].token_ids, updates

    async def main() -> list[tuple[list[int], int]]:
        return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))

    results = asyncio.run(main())
    assert [r[0] for r in results] == expected
    assert all(r[1] > 1 for r in results)  # streamed step by step, not one final blob
    assert _all_free(engine)


def test_cancel_mid_stream_frees_blocks(engine: AsyncLLMEngine):
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def main() -> None:
        stream = engine.generate("cancel-me", PROMPTS[2], params)
        builder = RequestOutputBuilder("cancel-me", None)
        async for delta in stream:
            if len(builder.add(delta).outputs[0].token_ids) >= 3:
                break
        await stream.aclose()
        for _ in range(100):
            if _all_free(engine):
                return
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert _all_free(engine)


def test_overload_and_bad_input(engine: AsyncLLMEngine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main() -> None:
        streams = [engine.generate(f"o{i}", PROMPTS[0], params) for i in range(4)]
        firsts = [await s.__anext__() for s in streams]
        assert all(not f.finished for f in firsts)
        with pytest.raises(EngineOverloadedError, match="max_pending_requests"):
            await engine.generate("one-too-many", PROMPTS[0], params).__anext__()
        for s in streams:
            await s.aclose()
        with pytest.raises(ValueError, match="prompt_token_ids"):
            await engine.generate("bad", [10**9], params).__anext__()

    asyncio.run(main())
    for _ in range(100):
        if _all_free(engine):
            break
        asyncio.run(asyncio.sleep(0.05))
    assert _all_free(engine) and engine.num_pending == 0
