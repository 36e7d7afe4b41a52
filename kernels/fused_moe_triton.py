"""Top-1 MoE expert FFN (SiLU-GLU) with a skip class as Triton kernels; the contract and the
torch reference are in `fused_moe_ref`.

vLLM-style "align by expert", no host sync so it can live in a CUDA graph:
1. sort token ids by expert and lay each expert's segment out padded to BLOCK_M, so every
   M-tile belongs to exactly one expert (`tile_expert[t]`, -1 for tiles past the end);
2. grouped GEMM hidden @ gate_up[e].T with the gate and up tiles accumulated by the same
   program, so the SiLU-GLU epilogue writes the intermediate [*, I] in one pass;
3. grouped GEMM intermediate @ down[e].T, routing weight applied in the fp32 epilogue, and
   the rows stored straight back at their token (top-1: each token appears at most once).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from zayaserve.kernels.fused_moe_ref import _check_rows
from zayaserve.kernels.target_triton import triton_target

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def align_by_expert(
    expert_rows: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids sorted by expert, each expert's segment padded to a multiple of `block_m`.

    Returns `sorted_ids` [L] int32 (padding and unused tail hold the sentinel T) and
    `tile_expert` [L / block_m] int64 (the expert of each M-tile, -1 past the last segment).
    L is a host-side upper bound (T + min(E, T) * (block_m - 1)), so nothing here waits on the
    device: segment sizes stay on the GPU."""
    num_tokens, dev = expert_rows.numel(), expert_rows.device
    bound = num_tokens + min(num_experts, num_tokens) * (block_m - 1)
    length = _cdiv(bound, block_m) * block_m
    # scatter_add instead of bincount: bincount reads max() back to the host.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, expert_rows + 1, torch.ones_like(expert_rows))
    skipped, counts = counts[0], counts[1:]  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    sorted_start = counts.cumsum(0) - counts + skipped  # where each expert begins after the sort

    order = torch.argsort(expert_rows, stable=True)  # -1 rows come first
    sorted_rows = expert_rows[order]
    expert = sorted_rows.clamp(min=0)
    rank = torch.arange(num_tokens, device=dev) - sorted_start[expert]
    dest = torch.where(sorted_rows >= 0, padded_start[expert] + rank, length)  # length = dump slot
    sorted_ids = torch.full((length + 1,), num_tokens, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))

    tile_start = torch.arange(0, length, block_m, device=dev)
    tile_expert = torch.searchsorted(padded_end, tile_start, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1)
    return sorted_ids[:length], tile_expert


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_m(num_tokens: int, num_experts: int) -> int:
    """M-tile height from the expected tokens per expert: small tiles waste less padding at
    decode, big tiles reuse each weight tile more at prefill. Fixed (not autotuned) because the
    padded layout depends on it."""
    if _TARGET == "interpreter":
        return 16
    per_expert = num_tokens / max(1, min(num_experts, num_tokens))
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


_TARGET = triton_target()


def _gemm_configs() -> list[Any]:
    cfg = triton.Config
    if _TARGET == "cuda":
        return [
            cfg({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
            cfg({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
            cfg({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            cfg({"BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
            cfg({"BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        ]
    if _TARGET == "hip":
        # MI300X: the stream pipeliner wants 2 stages; 16x16 MFMA suits these skinny tiles;
        # waves_per_eu trades registers for occupancy. These kwargs exist only on HIP.
        def hip(n: int, k: int, warps: int, waves: int) -> Any:
            return cfg(
                {"BLOCK_N": n, "BLOCK_K": k, "waves_per_eu": waves, "matrix_instr_nonkdim": 16},
                num_warps=warps, num_stages=2)

        return [hip(64, 64, 4, 2), hip(128, 64, 4, 2), hip(128, 64, 8, 0), hip(256, 32, 8, 0),
                hip(64, 128, 4, 3)]
    # Interpreter (or no GPU): one config, big enough that few numpy steps run per program.
    return [cfg({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "BLOCK_M"])
@triton.jit
def _gate_up_glu_kernel(
    hidden_ptr, w_ptr, act_ptr, sorted_ids_ptr, tile_expert_ptr,
    num_tokens, N, K,  # N = I (intermediate), K = H
    stride_ht, stride_we, stride_wn, stride_at,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = tl.load(sorted_ids_ptr + offs_m)
    row_ok = tokens < num_tokens
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = hidden_ptr + tokens[:, None].to(tl.int64) * stride_ht + offs_k[None, :]
    w_base = w_ptr + expert * stride_we + offs_k[:, None]  # [K, N] view of gate_up[e].T
    gate_ptrs = w_base + offs_n[None, :] * stride_wn
    up_ptrs = w_base + (offs_n[None, :] + N) * stride_wn  # up is the second half of 2I
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(gate_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        u = tl.load(up_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot reads bf16 bit patterns as integers
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_gate = tl.dot(a, g, acc_gate, input_precision="ieee")
        acc_up = tl.dot(a, u, acc_up, input_precision="ieee")
        a_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up  # SiLU-GLU in fp32, rounded once
    # The intermediate stays in padded sorted order: the down GEMM reads it with the
    # same tile map, so no gather is needed between the two GEMMs.
    act_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_at + offs_n[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "BLOCK_M"])
@triton.jit
def _down_kernel(
    act_ptr, w_ptr, out_ptr, route_w_ptr, sorted_ids_ptr, tile_expert_ptr,
    num_tokens, N, K,  # N = H, K = I
    stride_at, stride_we, stride_wn, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = tl.load(sorted_ids_ptr + offs_m)
    row_ok = tokens < num_tokens
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_at + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] + offs_n[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision="ieee")
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    route_w = tl.load(route_w_ptr + tokens, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * route_w[:, None]
    # Top-1: a token occupies one padded row, so a plain indexed store un-permutes.
    out_ptrs = out_ptr + tokens[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def fused_moe_triton(
    hidden: torch.Tensor,  # [T, H]
    expert_rows: torch.Tensor,  # [T] int64, -1 = no expert here
    weights: torch.Tensor,  # [T]
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:
    """Same contract as `fused_moe_ref`; two grouped-GEMM launches, no host synchronisation."""
    num_tokens, hid = hidden.shape
    num_experts, two_inter, hid_w = gate_up.shape
    inter = two_inter // 2
    assert hidden.dtype in _DTYPES, f"hidden dtype {hidden.dtype} unsupported"
    assert gate_up.dtype == down.dtype == hidden.dtype, "weights must be in hidden's dtype"
    assert hid_w == hid and two_inter == 2 * inter, f"gate_up {tuple(gate_up.shape)} vs H={hid}"
    assert down.shape == (num_experts, hid, inter), f"down {tuple(down.shape)}"
    _check_rows(expert_rows, num_tokens)
    assert weights.shape == (num_tokens,), f"weights {tuple(weights.shape)}"
    assert weights.dtype in (hidden.dtype, torch.float32), f"weights dtype {weights.dtype}"
    assert hidden.stride(1) == 1, "hidden rows must be contiguous"
    assert gate_up.is_contiguous() and down.is_contiguous(), "expert weights must be contiguous"
    devices = {t.device for t in (hidden, expert_rows, weights, gate_up, down)}
    assert len(devices) == 1, f"tensors on several devices: {devices}"
    weights = weights.contiguous()

    out = torch.zeros_like(hidden)  # skipped rows are never written: exact zeros
    if num_tokens == 0 or num_experts == 0:
        return out
    block_m = _block_m(num_tokens, num_experts)
    sorted_ids, tile_expert = align_by_expert(expert_rows, num_experts, block_m)
    act = torch.empty(sorted_ids.numel(), inter, dtype=hidden.dtype, device=hidden.device)
    upcast = _TARGET == "interpreter"
    num_tiles = tile_expert.numel()

    def grid_inter(meta: dict[str, Any]) -> tuple[int, int]:
        return num_tiles, triton.cdiv(inter, meta["BLOCK_N"])

    _gate_up_glu_kernel[grid_inter](
        hidden, gate_up, act, sorted_ids, tile_expert,
        num_tokens, inter, hid,
        hidden.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
        BLOCK_M=block_m, UPCAST=upcast,
    )

    def grid_out(meta: dict[str, Any]) -> tuple[int, int]:
        return num_tiles, triton.cdiv(hid, meta["BLOCK_N"])

    _down_kernel[grid_out](
        act, down, out, weights, sorted_ids, tile_expert,
        num_tokens, hid, inter,
        act.stride(0), down.stride(0), down.stride(1), out.stride(0),
        BLOCK_M=block_m, UPCAST=upcast,
    )
    return out
