"""`pytest -m gpu`: the engine on the accelerator (CUDA, or ROCm's `cuda` device).

- fidelity on the GPU against transformers' ZayaForCausalLM (fp32 reference on the CPU): fp32
  within 1e-4 and the same greedy tokens; bf16 within the tolerance below;
- every Triton kernel against its torch reference on the device, compiled (not interpreted);
- the whole engine with decode graphs on and off: identical greedy tokens.

Without a GPU these tests skip, except under `bench/gpu_check.sh --dry-run`
(ZAYASERVE_GPU_DRY_RUN=1, TRITON_INTERPRET=1): then the same code runs on the CPU at the same
small sizes, with Triton's interpreter and the re-running graph backend standing in.

bf16 tolerance: the engine in bf16 against the fp32 reference, prompt logprobs within 0.4 at
worst and 0.1 on average. bf16 keeps 8 bits of mantissa (a logit of ~10 carries ~0.04 of
rounding, and the layers add up); on the CPU in bf16 this case measures 0.13 worst and 0.043
mean, and a real fault (a residual rounded to bf16, a wrong scale) costs whole nats. Greedy
tokens are compared in fp32 only: near-ties flip under bf16 rounding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_reference import build_hf_checkpoint, reference_greedy, reference_prompt_logprobs

from zayaserve import LLM, SamplingParams

DRY_RUN = os.environ.get("ZAYASERVE_GPU_DRY_RUN") == "1"
GPU = torch.cuda.is_available() and not DRY_RUN
DEVICE = "cuda" if GPU else "cpu"
BF16_MAX, BF16_MEAN = 0.4, 0.1

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (GPU or DRY_RUN), reason="needs a GPU (or ZAYASERVE_GPU_DRY_RUN=1)"),
]


@pytest.fixture(scope="module", autouse=True)
def _compiled_kernels() -> None:
    if GPU:
        assert os.environ.get("TRITON_INTERPRET") != "1", (
            "TRITON_INTERPRET=1 is set (the kernel test modules set it on import): run "
            "tests/test_gpu.py in a pytest process of its own, as bench/gpu_check.sh does")


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]], list[Any]]:
    path = tmp_path_factory.mktemp("gpu-fidelity")
    model = build_hf_checkpoint(path, seed=11)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(6, 320, (n,), generator=gen).tolist() for n in (1, 7, 19, 40)]
    refs = [(reference_prompt_logprobs(model, p), reference_greedy(model, p, 16))
            for p in prompts]
    return path, prompts, refs


def _generate(path: Path, prompts: list[list[int]], dtype: str, **settings: Any) -> list[Any]:
    llm = LLM(model=str(path), device=DEVICE, dtype=dtype, block_size=8, **settings)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=0)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params)  # type: ignore


def _errors(prompts: list[list[int]], outs: list[Any], refs: list[Any]) -> torch.Tensor:
    errs = []
    for prompt, out, (ref_lp, _) in zip(prompts, outs, refs, strict=True):
        got = torch.tensor([out.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt)
                            if i > 0])
        errs.append((got - ref_lp).abs())
    return torch.cat(errs)


def test_fp32_on_the_device_matches_transformers(case: Any) -> None:
    path, prompts, refs = case
    outs = _generate(path, prompts, "float32", max_num_batched_tokens=24)  # chunked prefill
    assert _errors(prompts, outs, refs).max().item() < 1e-4
    assert [o.outputs[0].token_ids for o in outs] == [r[1] for r in refs]


def test_bf16_on_the_device_is_within_tolerance(case: Any) -> None:
    path, prompts, refs = case
    errs = _errors(prompts, _generate(path, prompts, "bfloat16"), refs)
    assert errs.max().item() < BF16_MAX and errs.mean().item() < BF16_MEAN, (
        errs.max().item(), errs.mean().item())


def test_graphs_on_and_off_give_identical_greedy_tokens(case: Any) -> None:
    """Batches of exactly a bucket's size and padded ones (3 of 4, 5 of 8)."""
    path, _, _ = case
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(6, 320, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 60, (8,), generator=gen)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = []
    for eager in (True, False):
        llm = LLM(model=str(path), device=DEVICE, dtype="float32", enforce_eager=eager)
        if not GPU and not eager:
            from zayaserve.replicas.engine.decode_graphs import RerunCapture

            llm.engine.runner.graphs = llm.engine.decode_graphs(RerunCapture())
        assert (llm.engine.runner.graphs is None) == eager
        results.append([[o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in batch], params)]  # type: ignore[misc]
            for batch in (prompts[:1], prompts[:3], prompts[:4], prompts[:5], prompts)])
        if not eager:
            graphs = llm.engine.runner.graphs
            assert graphs is not None and {1, 4, 8} <= set(graphs._graphs)
    assert results[0] == results[1]


def test_a_local_expert_decode_step_is_one_graph_without_host_syncs(case: Any) -> None:
    """With the Triton fused MoE (tokens grouped by expert on the device), a decode step with
    in-process experts is one graph, and replaying it makes no host synchronisation: every
    replay after its bucket's capture runs under `torch.cuda.set_sync_debug_mode("error")`.
    Tokens are the eager engine's."""
    path, _, _ = case
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(6, 320, (n,), generator=gen).tolist() for n in (4, 9, 21)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    eager = LLM(model=str(path), device=DEVICE, dtype="float32", enforce_eager=True)
    want = [o.outputs[0].token_ids for o in eager.generate(batch, params)]  # type: ignore
    llm = LLM(model=str(path), device=DEVICE, dtype="float32", enable_prefix_caching=False)
    if not GPU:
        from zayaserve.replicas.engine.decode_graphs import RerunCapture

        # The CPU's fused MoE is torch's (it syncs): the wiring is what runs here.
        llm.engine.runner.graphs = llm.engine.decode_graphs(RerunCapture(), whole_step=True)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.whole_step  # on a GPU: the default
    run, checked = graphs.run, []

    def no_sync_run(chunks: Any, rows: Any, snapshots: Any) -> torch.Tensor:
        if not GPU or graphs.bucket_for(len(chunks)) not in graphs._graphs:
            return run(chunks, rows, snapshots)  # capturing (with its warm-up) may sync
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = run(chunks, rows, snapshots)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(len(chunks))
        return out

    graphs.run = no_sync_run  # type: ignore[method-assign]
    for _ in range(2):  # the second time every bucket is captured
        got = [o.outputs[0].token_ids for o in llm.generate(batch, params)]  # type: ignore
        assert got == want
    assert len(graphs._graphs) >= 1 and all(not b.expert_inputs
                                            for b in graphs._graphs.values())
    assert checked or not GPU


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    err = (a.float() - b.float()).abs().max().item()
    assert err < tol * (1 + b.float().abs().max().item()), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_their_references_on_the_device(dtype: torch.dtype) -> None:
    from zayaserve.kernels.cache_encoding_ref import quantize_ref
    from zayaserve.kernels.cache_encoding_triton import quantize_triton
    from zayaserve.kernels.fused_moe_ref import fused_moe_ref
    from zayaserve.kernels.fused_moe_triton import fused_moe_triton
    from zayaserve.kernels.paged_attention_ref import paged_attention_torch
    from zayaserve.kernels.paged_attention_triton import paged_attention_triton

    tol = 1e-4 if dtype == torch.float32 else 3e-2
    dev, gen = DEVICE, torch.Generator(device=DEVICE).manual_seed(0)
    hid, inter, experts, tokens = (256, 128, 8, 64) if GPU else (32, 16, 4, 6)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dtype)

    hidden = randn(tokens, hid)
    rows = torch.randint(-1, experts, (tokens,), generator=gen, device=dev)
    weights = torch.rand(tokens, generator=gen, device=dev).to(dtype)
    gate_up, down = randn(experts, 2 * inter, hid, scale=hid ** -0.5), randn(
        experts, hid, inter, scale=inter ** -0.5)
    args = (hidden, rows, weights, gate_up, down)
    _close(fused_moe_triton(*args), fused_moe_ref(*args), tol)

    nq, nkv, d, bs = (8, 2, 128, 16) if GPU else (4, 2, 16, 4)
    ctx = [300, 1, 77, 1024] if GPU else [9, 1, 5]
    q_lens = [1, 1, 5, 1] if GPU else [1, 1, 3]
    blocks = [-(-c // bs) for c in ctx]
    perm = torch.randperm(sum(blocks) + 3, generator=torch.Generator().manual_seed(1))
    table = torch.full((len(ctx), max(blocks)), -1, dtype=torch.int64)
    start = 0
    for s, n in enumerate(blocks):
        table[s, :n] = perm[start:start + n]
        start += n
    k_cache, v_cache = randn(perm.numel() * bs, nkv, d), randn(perm.numel() * bs, nkv, d)
    q = randn(sum(q_lens), nq, d)
    qs = torch.tensor([0] + q_lens, device=dev).cumsum(0)
    lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
    for window in (None, 64 if GPU else 4):
        call = (q, k_cache, v_cache, qs, lens, table.to(dev), bs, d ** -0.5, window)
        _close(paged_attention_triton(*call), paged_attention_torch(*call), tol)

    x = randn(12, 16, nkv, d)
    for enc in ("int8", "fp8"):
        for got, want in zip(quantize_triton(x, enc), quantize_ref(x, enc), strict=True):
            _close(got, want, 1e-2)
