"""Decode graphs, tested where no GPU is: the engine with graphs (a backend that re-runs each
captured segment against the same static buffers, as a replay reads them) gives exactly what the
eager engine gives, through padding buckets, sliding windows, seeded sampling, logprobs,
prefix-cache snapshots taken during decode, and steps that mix in prefills (which stay eager).
On a GPU, tests/test_gpu.py compares real CUDA graphs with eager the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zayaserve import LLM, SamplingParams
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.decode_graphs import DecodeGraphs, RerunCapture, default_buckets

PROMPTS = [list(range(7, 7 + n)) for n in (3, 17, 30, 9, 40)]  # 5 sequences: bucket 8


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[tuple]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)  # type: ignore
    return [(c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids,
                                                           strict=True)])
            for o in outs for c in o.outputs]


def _same(a: list[tuple], b: list[tuple]) -> bool:
    """Same tokens; logprobs equal to float32 rounding (the graph path's torch attention
    gathers the whole block table, eager only the blocks in use: same sums, other order)."""
    return [t for t, _ in a] == [t for t, _ in b] and all(
        abs(x - y) < 1e-4 for (_, la), (_, lb) in zip(a, b, strict=True)
        for x, y in zip(la, lb, strict=True))


def _llm(checkpoint: Path, graphs: bool, **settings: object
         ) -> tuple[LLM, RerunCapture | None]:
    llm = LLM(model=str(checkpoint), device="cpu", num_kv_blocks=96, max_model_len=256,
              max_num_seqs=8, **settings)
    if not graphs:
        return llm, None
    backend = RerunCapture()
    llm.engine.runner.graphs = llm.engine.decode_graphs(backend)
    return llm, backend


@pytest.fixture(scope="module")
def pair(tiny_checkpoint: Path) -> tuple[LLM, LLM, RerunCapture]:
    eager, _ = _llm(tiny_checkpoint, False)
    graphs, backend = _llm(tiny_checkpoint, True)
    assert backend is not None
    return eager, graphs, backend


def test_graphs_match_eager_greedy_and_sampled(pair: tuple[LLM, LLM, RerunCapture]) -> None:
    eager, graphs, backend = pair
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    sampled = SamplingParams(temperature=0.9, top_k=20, seed=5, n=2, max_tokens=12,
                             ignore_eos=True, logprobs=1)
    for params in (greedy, sampled):
        for prompts in (PROMPTS, PROMPTS[:1], PROMPTS[:3]):  # buckets 8, 1, 4
            assert _same(_run(graphs, prompts, params), _run(eager, prompts, params))
    layers = graphs.engine.model_config.num_hidden_layers
    graph_runner = graphs.engine.runner.graphs
    assert graph_runner is not None and {1, 4, 8} <= set(graph_runner._graphs)
    assert backend.captures == len(graph_runner._graphs) * (layers + 1)  # once per bucket
    assert backend.replays > 20 * (layers + 1)  # and replayed on every decode step


def test_whole_step_graphs_hold_the_experts(tiny_checkpoint: Path,
                                            pair: tuple[LLM, LLM, RerunCapture]) -> None:
    """With local experts in the graph (one capture per bucket, experts inside it), decode
    gives what eager gives, snapshots included. On a GPU the Triton fused MoE makes this the
    default, and tests/test_gpu.py replays it with host syncs made errors."""
    eager = pair[0]
    whole = LLM(model=str(tiny_checkpoint), device="cpu", num_kv_blocks=96, max_model_len=256,
                max_num_seqs=8)
    backend = RerunCapture()
    graphs = whole.engine.runner.graphs = whole.engine.decode_graphs(backend, whole_step=True)
    assert graphs is not None and graphs.whole_step
    assert not whole.engine.decode_graphs(RerunCapture()).whole_step  # torch MoE: split
    calls: list[int] = []
    experts = graphs.experts
    graphs.experts = lambda layer, *a: calls.append(layer) or experts(layer, *a)  # type: ignore
    params = SamplingParams(temperature=0.9, top_k=20, seed=5, n=2, max_tokens=12,
                            ignore_eos=True, logprobs=1)
    for prompts in (PROMPTS, PROMPTS[:3]):
        assert _same(_run(whole, prompts, params), _run(eager, prompts, params))
    assert backend.captures == len(graphs._graphs) == 2  # buckets 8 and 4, one graph each
    layers = whole.engine.model_config.num_hidden_layers
    assert backend.replays > 10 and len(calls) == layers * (backend.replays + backend.captures)


def test_decode_snapshots_feed_the_prefix_cache(pair: tuple[LLM, LLM, RerunCapture]) -> None:
    """Blocks completed during (graph) decode keep their CCA states: a prompt that extends a
    finished sequence resumes from them and continues exactly as eager does."""
    eager, graphs, _ = pair
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0)
    base = [list(range(40, 51))]  # 11 prompt tokens: decode completes block 1 (16 tokens)
    first = _run(graphs, base, params)
    assert _same(first, _run(eager, base, params))
    longer = [base[0] + first[0][0] + [5]]
    hits = graphs.engine.stats()["prefix_cache_local_hit_tokens"]
    assert _same(_run(graphs, longer, params), _run(eager, longer, params))
    assert graphs.engine.stats()["prefix_cache_local_hit_tokens"] >= hits + 16


def test_graph_steps_leave_no_state_behind(pair: tuple[LLM, LLM, RerunCapture]) -> None:
    """Padding rows write only the scratch block and state slot, which no sequence owns."""
    _, graphs, _ = pair
    eng = graphs.engine
    cache = eng.cache
    assert cache.scratch_block == eng.scheduler.blocks.num_blocks
    assert cache.scratch_state_slot == eng.config.max_num_seqs
    assert cache.k[0].shape[0] == (cache.scratch_block + 1) * cache.block_size


def test_graphs_are_off_on_the_cpu_and_with_enforce_eager(tiny_checkpoint: Path) -> None:
    llm = LLM(model=str(tiny_checkpoint), device="cpu", num_kv_blocks=16)
    assert llm.engine.runner.graphs is None
    assert EngineConfig(model="x").enforce_eager is False
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig.create(model="x", enforce_eager="sometimes")
    two = LLM(model=str(tiny_checkpoint), device="cpu", num_kv_blocks=16, micro_batches=2)
    graphs = two.engine.decode_graphs(RerunCapture())
    assert isinstance(graphs, DecodeGraphs)
    two.engine.runner.__init__(two.engine.model, two.engine.experts,  # type: ignore[misc]
                               two.engine.cache, 2, graphs)
    assert two.engine.runner.graphs is None  # micro-batches split steps: no graphs


def test_buckets() -> None:
    assert default_buckets(1) == [1]
    assert default_buckets(6) == [1, 2, 4, 6]
    assert default_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_buckets(20) == [1, 2, 4, 8, 16, 20]


def test_bucket_choice_and_overflow_run_eager(pair: tuple[LLM, LLM, RerunCapture]) -> None:
    _, graphs, _ = pair
    runner = graphs.engine.runner.graphs
    assert runner is not None
    assert [runner.bucket_for(n) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, None]
    assert torch.equal(runner.y[:0], runner.y[:0])


def test_graph_steps_create_no_tensor_without_a_device(tiny_checkpoint: Path) -> None:
    from test_device import FactoryGuard

    llm, _ = _llm(tiny_checkpoint, True)
    guard = FactoryGuard()
    with guard:
        _run(llm, PROMPTS[:3], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                              logprobs=0))
    assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs._graphs
    assert not guard.violations, sorted(set(guard.violations))


def test_longer_contexts_than_captured_run_eager(pair: tuple[LLM, LLM, RerunCapture],
                                                  tiny_checkpoint: Path) -> None:
    """max_seq_len_to_capture=32: the graphs hold 2 blocks of table; a step with a longer
    sequence runs eagerly, and results still match (tables also shrink and grow between steps
    of one bucket, so stale columns must never be read)."""
    eager, _, _ = pair
    short, backend = _llm(tiny_checkpoint, True, max_seq_len_to_capture=32)
    assert backend is not None and short.engine.runner.graphs is not None
    assert short.engine.runner.graphs.width == 2
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=0)
    prompts = [list(range(60, 64)), list(range(70, 75))]
    assert _same(_run(short, prompts, params), _run(eager, prompts, params))
    layers = short.engine.model_config.num_hidden_layers
    # 4-5 prompt tokens + 30: graphs until a context passes 32, eager after
    assert 0 < backend.replays < 30 * (layers + 1)
