"""CCA decode kernel: torch reference == model code, Triton (interpreter) == torch reference.

Tolerances: reference vs model fp32 atol 1e-5 (bf16: bit-identical, same ops in the same order);
Triton vs reference fp32 atol 1e-4; bf16 atol 6e-2 against the bf16 reference (which rounds after
every op) and 1e-3 + 0.8% (two bf16 half-ulps) against the fp32 reference on the same bf16
inputs (the kernel computes in fp32 and rounds once). State updates are copies, so they must
be bit-identical everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

# NATIVE=1 reruns the Triton comparisons compiled for a real GPU (see the last test).
NATIVE = os.environ.get("ZAYASERVE_CCA_NATIVE") == "1"
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere below

import pytest  # noqa: E402
import torch  # noqa: E402

from zayaserve.kernels.cca_decode_ref import cca_decode_ref  # noqa: E402
from zayaserve.kernels.cca_decode_triton import cca_decode_triton  # noqa: E402
from zayaserve.kernels.registry import get_op  # noqa: E402
from zayaserve.replicas.model.batch import StepBatch  # noqa: E402
from zayaserve.replicas.model.builtin.presets import preset_config  # noqa: E402
from zayaserve.replicas.model.builtin.random_checkpoint import init_tensor  # noqa: E402
from zayaserve.replicas.model.cca import CCAProjection, qk_l2_norm  # noqa: E402
from zayaserve.replicas.model.config import ZayaConfig  # noqa: E402
from zayaserve.replicas.model.layers import apply_partial_rope, rope_cos_sin  # noqa: E402

NUM_SLOTS = 9
SLOTS = [5, 0, 3, 8, 1, 7, 2]  # not in order, not contiguous
POSITIONS = [100_000, 0, 7, 131_071, 4_999_999, 1, 65_536]
DEVICE = "cuda" if NATIVE else "cpu"


def make_config(t0: int, t1: int, nq: int, nkv: int, d: int, factor: float) -> ZayaConfig:
    rope = {kind: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor}
            for kind, theta in (("hybrid", 5e6), ("hybrid_sliding", 1e4))}
    raw = preset_config("tiny", overrides={
        "cca_time0": t0, "cca_time1": t1, "num_attention_heads": nq,
        "num_key_value_heads": nkv, "head_dim": d, "hidden_size": 32, "rope_parameters": rope})
    return ZayaConfig.from_dict(raw)


def make_projection(cfg: ZayaConfig, dtype: torch.dtype) -> tuple[CCAProjection, torch.Tensor]:
    """A CCAProjection with checkpoint-style random weights (biases on) and its QK temp."""
    cfg = cfg.model_copy(update={"attention_bias": True})
    module = CCAProjection(cfg)
    prefix = "model.layers.0.self_attn."
    for name, p in module.named_parameters():
        full = prefix + "qkv_proj." + name
        # Biases are scaled up from the checkpoint's small init so that they visibly matter.
        p.data = init_tensor(full, p.shape) * (1.0 if name.endswith("weight") else 6.0)
    module.to(dtype)  # before fusing: the fused copy is a plain attribute `.to` would not move
    module.fuse_projections()
    temp = init_tensor(prefix + "qk_norm.temp", (cfg.num_key_value_heads,)).to(dtype)
    return module, temp


def random_states(cfg: ZayaConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    conv = torch.randn(NUM_SLOTS, cfg.conv_state_len, cfg.conv_channels, generator=gen)
    v = torch.randn(NUM_SLOTS, cfg.v_state_size, generator=gen)
    return conv.to(dtype), v.to(dtype)


def kernel_args(module: CCAProjection, temp: torch.Tensor, cfg: ZayaConfig, kind: str) -> dict:
    return dict(
        dw_weight=module.conv_qk_depthwise.weight.detach(),
        dw_bias=module.conv_qk_depthwise.bias.detach(),
        gw_weight=module.conv_qk_grouped.weight.detach(),
        gw_bias=module.conv_qk_grouped.bias.detach(), temp=temp,
        num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, rotary_dim=cfg.rotary_dim(kind),
        rope_theta=cfg.rope_parameters[kind].rope_theta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("t0", "t1", "nq", "nkv", "d", "factor", "batch"), [
    (2, 2, 4, 2, 16, 0.5, 7), (3, 2, 8, 2, 64, 1.0, 3), (1, 3, 2, 2, 16, 0.5, 1),
    (1, 1, 8, 1, 16, 1.0, 7), (2, 2, 8, 2, 128, 0.5, 7)])
def test_reference_matches_model_code(t0, t1, nq, nkv, d, factor, batch, dtype) -> None:
    cfg = make_config(t0, t1, nq, nkv, d, factor)
    module, temp = make_projection(cfg, dtype)
    x = torch.randn(batch, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    slots, positions = SLOTS[:batch], POSITIONS[:batch]
    step = StepBatch.build([([11], p, [0], s) for p, s in zip(positions, slots, strict=True)],
                           block_size=1 << 23, logits_rows=list(range(batch)))
    for kind in ("hybrid", "hybrid_sliding"):
        conv_m, v_m = random_states(cfg, dtype)
        conv_r, v_r = conv_m.clone(), v_m.clone()
        with torch.no_grad():
            q_m, k_m, v_out_m = module(x, step, conv_m, v_m)
            q_m, k_m = qk_l2_norm(q_m, k_m, temp)
            rope = rope_cos_sin(step.positions, cfg.rotary_dim(kind),
                                cfg.rope_parameters[kind].rope_theta, dtype)
            q_m, k_m = apply_partial_rope(q_m, *rope), apply_partial_rope(k_m, *rope)
            proj = torch.cat(module._project(x), dim=-1)
            q_r, k_r, v_out_r = cca_decode_ref(proj, conv_r, v_r, step.state_slots,
                                               step.positions, **kernel_args(module, temp, cfg,
                                                                             kind))
        # The model's chunk path runs the convs as torch conv1d (the reference model's own op);
        # the decode reference sums the taps by hand. fp32 agrees to 1e-5; in bf16 the two
        # round at different points: observed worst 0.047 on values of magnitude up to ~4.
        atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (0.1, 0.05)
        for got, want in ((q_r, q_m), (k_r, k_m)):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        torch.testing.assert_close(v_out_r, v_out_m, atol=0.0, rtol=0.0)  # no conv on v
        assert torch.equal(conv_r, conv_m) and torch.equal(v_r, v_m)


def random_inputs(cfg: ZayaConfig, batch: int, dtype: torch.dtype, kind: str) -> dict:
    module, temp = make_projection(cfg, dtype)
    gen = torch.Generator().manual_seed(11)
    proj_cols = cfg.conv_channels + 2 * cfg.v_state_size
    conv, v = random_states(cfg, dtype)
    args = dict(proj=torch.randn(batch, proj_cols, generator=gen).to(dtype), conv_state=conv,
                v_state=v, state_slots=torch.tensor(SLOTS[:batch]),
                positions=torch.tensor(POSITIONS[:batch]),
                **kernel_args(module, temp, cfg, kind))
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def run_both(args: dict) -> tuple[tuple, tuple, dict, dict]:
    """Runs kernel and reference on separate copies (both update the states in place)."""
    tri_args = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    ref_args = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return (cca_decode_triton(**tri_args), cca_decode_ref(**ref_args), tri_args, ref_args)


CASES = [  # t0, t1, nq, nkv, d, rotary factor, batch, layer kind
    (2, 2, 4, 2, 16, 0.5, 7, "hybrid"),
    (3, 2, 8, 2, 64, 0.5, 1, "hybrid_sliding"),
    (1, 3, 2, 2, 16, 1.0, 7, "hybrid"),
    (1, 1, 8, 1, 64, 1.0, 7, "hybrid_sliding"),
    (2, 2, 8, 2, 128, 0.5, 7, "hybrid"),  # ZAYA1-8B's head layout
    (1, 1, 4, 2, 128, 1.0, 1, "hybrid"),
    (3, 2, 2, 2, 128, 0.5, 3, "hybrid_sliding"),
    (1, 3, 8, 2, 64, 1.0, 7, "hybrid"),
    (2, 2, 8, 1, 16, 1.0, 1, "hybrid_sliding"),
    (2, 2, 4, 2, 24, 0.5, 3, "hybrid"),  # head_dim and rotary half not powers of two
]


@pytest.mark.parametrize(("t0", "t1", "nq", "nkv", "d", "factor", "batch", "kind"), CASES)
def test_triton_matches_reference_fp32(t0, t1, nq, nkv, d, factor, batch, kind) -> None:
    args = random_inputs(make_config(t0, t1, nq, nkv, d, factor), batch, torch.float32, kind)
    (q, k, v), (q_r, k_r, v_r), tri, ref = run_both(args)
    for got, want in ((q, q_r), (k, k_r), (v, v_r)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(tri["conv_state"], ref["conv_state"])
    assert torch.equal(tri["v_state"], ref["v_state"])
    untouched = [s for s in range(NUM_SLOTS) if s not in SLOTS[:batch]]
    assert torch.equal(tri["conv_state"][untouched], args["conv_state"][untouched])


BF16_CASES = [  # bf16 is slow under the interpreter: fewer, smaller cases
    (2, 2, 4, 2, 16, 0.5, 7, "hybrid"),
    (1, 1, 8, 1, 64, 1.0, 3, "hybrid_sliding"),
    (2, 2, 8, 2, 128, 0.5, 3, "hybrid"),
    (1, 3, 2, 2, 64, 1.0, 1, "hybrid"),
]


@pytest.mark.parametrize(("t0", "t1", "nq", "nkv", "d", "factor", "batch", "kind"), BF16_CASES)
def test_triton_matches_reference_bf16(t0, t1, nq, nkv, d, factor, batch, kind) -> None:
    args = random_inputs(make_config(t0, t1, nq, nkv, d, factor), batch, torch.bfloat16, kind)
    (q, k, v), (q_r, k_r, v_r), tri, ref = run_both(args)
    for got, want in ((q, q_r), (k, k_r)):
        torch.testing.assert_close(got, want, atol=6e-2, rtol=2e-2)
    assert torch.equal(v, v_r)
    assert torch.equal(tri["conv_state"], ref["conv_state"])
    assert torch.equal(tri["v_state"], ref["v_state"])
    # Against fp32 math on the same bf16 inputs only the kernel's final rounding remains.
    ref32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
             for k, v in args.items()}
    q_32, k_32, _ = cca_decode_ref(**ref32)
    for got, want in ((q, q_32), (k, k_32)):
        torch.testing.assert_close(got.float(), want, atol=1e-3, rtol=8e-3)


def test_registry_dispatch_and_empty_batch() -> None:
    args = random_inputs(make_config(2, 2, 4, 2, 16, 0.5), 7, torch.float32, "hybrid")
    args.update(proj=args["proj"][:0], state_slots=args["state_slots"][:0],
                positions=args["positions"][:0])
    conv_before = args["conv_state"].clone()
    q, k, v = get_op("cca_decode", "triton")(**args)
    assert q.shape == (0, 4, 16) and k.shape == v.shape == (0, 2, 16)
    assert torch.equal(args["conv_state"], conv_before)
    assert get_op("cca_decode", "torch") is cca_decode_ref


def test_rejects_bad_shapes() -> None:
    args = random_inputs(make_config(2, 2, 4, 2, 16, 0.5), 3, torch.float32, "hybrid")
    with pytest.raises(AssertionError, match="int64"):
        cca_decode_triton(**{**args, "positions": args["positions"].int()})
    with pytest.raises(AssertionError, match="conv_state"):
        cca_decode_triton(**{**args, "conv_state": args["conv_state"][:, :1].contiguous()})
    with pytest.raises(AssertionError, match="contiguous"):
        cca_decode_triton(**{**args, "proj": args["proj"].t().contiguous().t()})


@pytest.mark.gpu
@pytest.mark.skipif(NATIVE or not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")
def test_compiled_kernel_on_gpu() -> None:
    """What the interpreter cannot check (compilation, the in-program barrier before the state
    writes, autotuning's state restore, the GPU's cos/sin): the same comparisons, compiled."""
    env = {**os.environ, "ZAYASERVE_CCA_NATIVE": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "triton_matches or registry or rejects"]
    subprocess.run(cmd, env=env, check=True, timeout=600)
