"""Fused top-1 MoE: the Triton kernel (run by the interpreter) against the torch reference, and
the reference against a naive per-token loop.

Tolerances: fp32 atol/rtol 1e-4 (both accumulate in fp32; only summation order differs).
bf16/fp16: the reference rounds gate, up, silu(gate)*up and y to the low dtype at each step
while the kernel keeps fp32 until the intermediate and the output (and the interpreter
truncates fp32->bf16 instead of rounding), so on outputs of magnitude ~1-3 they are compared
at atol = rtol = 3e-2 for bf16 (observed max |diff| ~2.3e-2, 1.5 bf16 ulps at 2) and
1e-2 for fp16 (observed ~3e-3).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from zayaserve.kernels.fused_moe_ref import fused_moe_ref  # noqa: E402
from zayaserve.kernels.fused_moe_triton import align_by_expert, fused_moe_triton  # noqa: E402

TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (1e-2, 1e-2)}


def make_case(
    num_tokens: int, hid: int, inter: int, num_experts: int, dtype: torch.dtype, seed: int = 0,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hid, generator=g).to(dtype)
    # Scaled so outputs are O(1): bf16 tolerances then read as a few ulps.
    gate_up = (torch.randn(num_experts, 2 * inter, hid, generator=g) / hid**0.5).to(dtype)
    down = (torch.randn(num_experts, hid, inter, generator=g) / inter**0.5).to(dtype)
    if rows is None:
        # Includes -1 (skip / not held here); some experts get no tokens when T is small.
        rows = torch.randint(-1, num_experts, (num_tokens,), generator=g)
    weights = torch.rand(num_tokens, generator=g).to(dtype)
    return hidden, rows, weights, gate_up, down


def naive(hidden, rows, weights, gate_up, down) -> torch.Tensor:
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        e = int(rows[t])
        if e < 0:
            continue
        gate, up = F.linear(hidden[t:t + 1], gate_up[e]).chunk(2, dim=-1)
        out[t] = (F.linear(F.silu(gate) * up, down[e]) * weights[t])[0].to(out.dtype)
    return out


def check(case: tuple[torch.Tensor, ...]) -> None:
    hidden = case[0]
    got = fused_moe_triton(*case)
    want = fused_moe_ref(*case)
    assert got.dtype == hidden.dtype and got.shape == hidden.shape
    atol, rtol = TOL[hidden.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    skipped = case[1] < 0
    assert torch.equal(got[skipped], torch.zeros_like(got[skipped]))  # exact zeros, not ~0


@pytest.mark.parametrize("hid,inter", [(48, 40), (64, 32)])  # not / powers of two (masking)
@pytest.mark.parametrize("num_experts", [1, 4, 64])  # 64: most experts get no token
@pytest.mark.parametrize("num_tokens", [1, 7, 64])  # 64 on 1-4 experts: multi-tile segments
def test_triton_matches_reference_fp32(num_tokens, num_experts, hid, inter) -> None:
    check(make_case(num_tokens, hid, inter, num_experts, torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference_low_precision(dtype) -> None:
    check(make_case(64, 48, 40, 4, dtype, seed=1))


def test_fp32_router_weights_with_bf16_hidden() -> None:
    hidden, rows, weights, gate_up, down = make_case(7, 48, 40, 4, torch.bfloat16, seed=2)
    check((hidden, rows, weights.float(), gate_up, down))


def test_all_tokens_skipped_gives_exact_zeros() -> None:
    case = make_case(7, 48, 40, 4, torch.float32, rows=torch.full((7,), -1))
    assert torch.equal(fused_moe_triton(*case), torch.zeros(7, 48))
    assert torch.equal(fused_moe_ref(*case), torch.zeros(7, 48))


def test_tokens_only_on_last_expert() -> None:
    check(make_case(7, 48, 40, 64, torch.float32, rows=torch.full((7,), 63)))


def test_expert_with_zero_tokens_between_busy_ones() -> None:
    rows = torch.tensor([0, 2, 2, 0, -1, 2, 3, 0, 3])  # expert 1 empty
    check(make_case(9, 48, 40, 4, torch.float32, rows=rows))


def test_no_tokens() -> None:
    case = make_case(0, 48, 40, 4, torch.float32)
    assert fused_moe_triton(*case).shape == (0, 48)
    assert fused_moe_ref(*case).shape == (0, 48)


def test_reference_is_the_model_grouped_math() -> None:
    """Bit-identical to `run_grouped` (the model's expert path) once the skip class and
    experts this process lacks are mapped to -1."""
    from zayaserve.replicas.model.experts import ExpertWeights, run_grouped

    hidden, rows, weights, gate_up, down = make_case(33, 48, 40, 4, torch.bfloat16, seed=4)
    expert_ids = torch.where(rows < 0, 4, rows)  # 4 = skip class of a 4-expert model
    want = run_grouped(ExpertWeights(range(4), gate_up, down), hidden, expert_ids, weights)
    assert torch.equal(fused_moe_ref(hidden, rows, weights, gate_up, down), want)


@pytest.mark.parametrize("num_tokens,num_experts", [(1, 1), (7, 4), (64, 64), (33, 4)])
def test_reference_matches_naive_loop(num_tokens, num_experts) -> None:
    case = make_case(num_tokens, 48, 40, num_experts, torch.float32, seed=3)
    torch.testing.assert_close(fused_moe_ref(*case), naive(*case), atol=1e-5, rtol=1e-5)


def test_reference_rejects_out_of_range_row() -> None:
    case = make_case(3, 16, 16, 2, torch.float32, rows=torch.tensor([0, 2, -1]))
    with pytest.raises(ValueError, match="expert row 2"):
        fused_moe_ref(*case)


def test_align_by_expert_layout() -> None:
    rows = torch.tensor([2, -1, 0, 2, 2, -1, 0])
    sorted_ids, tile_expert = align_by_expert(rows, num_experts=4, block_m=2)
    sentinel = rows.numel()
    # expert 0: tokens 2, 6; expert 1: none; expert 2: tokens 0, 3, 4 (+1 pad); skips dropped.
    assert sorted_ids[:6].tolist() == [2, 6, 0, 3, 4, sentinel]
    assert (sorted_ids[6:] == sentinel).all()
    assert tile_expert[:3].tolist() == [0, 2, 2] and (tile_expert[3:] == -1).all()


def test_registry_resolves_both_backends() -> None:
    from zayaserve.kernels.registry import get_op

    assert get_op("fused_moe", "torch") is fused_moe_ref
    assert get_op("fused_moe", "triton") is fused_moe_triton
