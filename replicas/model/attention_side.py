"""The attention side of ZAYA1: embeddings, CCA attention, MoE gates, norms, residual scaling and
the lm_head. Expert FFNs are reached only through an `ExpertBackend`.

Module and parameter names follow the transformers checkpoint, so loading is name for name.
"""

from __future__ import annotations

import torch
from torch import nn

from zayaserve.kernels.paged_attention_ref import plan_attention
from zayaserve.kernels.registry import default_kernels, get_op
from zayaserve.replicas.model.batch import StepBatch
from zayaserve.replicas.model.cca import CCAProjection, qk_l2_norm
from zayaserve.replicas.model.config import ZayaConfig
from zayaserve.replicas.model.experts import ExpertBackend
from zayaserve.replicas.model.gate import Gate, Routing
from zayaserve.replicas.model.kv_cache import KVCache
from zayaserve.replicas.model.layers import (
    ResidualScaling,
    RMSNorm,
    apply_partial_rope,
    rope_cos_sin,
)


class QKNorm(nn.Module):
    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.temp = nn.Parameter(torch.zeros(config.num_key_value_heads))


class SelfAttention(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        self.qkv_proj = CCAProjection(config)
        self.qk_norm = QKNorm(config)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.attention_bias)
        self.window = config.window(layer_idx)
        self.scale = config.head_dim ** -0.5


class MoERouting(nn.Module):
    """Holds the gate under the checkpoint's `mlp.gate` name; experts live elsewhere."""

    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        self.gate = Gate(config, layer_idx)


class AttentionLayer(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_residual_scale = ResidualScaling(config.hidden_size)
        self.post_mlp_residual_scale = ResidualScaling(config.hidden_size)
        self.mlp = MoERouting(config, layer_idx)

    def forward(
        self,
        residual: torch.Tensor,  # [T, H] fp32
        gate_state: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: StepBatch,
        cache: KVCache,
        experts: ExpertBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual, x, routing = self.attend(residual, gate_state, rope, batch, cache)
        y = experts(self.layer_idx, x, routing.expert_ids, routing.weights)
        return self.finish(y, residual), routing.state

    def attend(
        self,
        residual: torch.Tensor,
        gate_state: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: StepBatch,
        cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """Everything of the layer before its experts: (residual, expert input, routing)."""
        i, attn = self.layer_idx, self.self_attn
        dtype = self.input_layernorm.weight.dtype
        x = self.input_layernorm(residual.to(dtype))
        snaps = None
        if cache.conv_snap is not None and cache.v_snap is not None:
            snaps = (cache.conv_snap[i], cache.v_snap[i])
        if batch.num_tokens == batch.num_seqs:  # all decodes: the fused CCA decode-step op
            q, k, v = self._cca_decode(x, batch, cache)
            if snaps is not None and batch.snapshot_rows is not None:
                # one token per sequence: the state it just left in its slot is the snapshot
                slots = batch.state_slots[batch.snapshot_rows]
                snaps[0][batch.snapshot_blocks] = cache.conv_state[i][slots]
                snaps[1][batch.snapshot_blocks] = cache.v_state[i][slots]
        else:
            q, k, v = attn.qkv_proj(x, batch, cache.conv_state[i], cache.v_state[i], snaps)
            q, k = qk_l2_norm(q, k, attn.qk_norm.temp)
            q = apply_partial_rope(q, *rope)
            k = apply_partial_rope(k, *rope)
        cache.k[i][batch.slot_mapping] = k
        cache.v[i][batch.slot_mapping] = v
        o = self._attention(q, batch, cache, attn)
        o = attn.o_proj(o.reshape(o.shape[0], -1))
        residual = self.post_attention_residual_scale(o, residual)
        x = self.post_attention_layernorm(residual.to(dtype))
        return residual, x, self.mlp.gate(x, gate_state)

    def finish(self, expert_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The experts' output joins the residual stream."""
        return self.post_mlp_residual_scale(expert_out, residual)

    def _attention(self, q: torch.Tensor, batch: StepBatch, cache: KVCache,
                   attn: SelfAttention) -> torch.Tensor:
        """GQA over the paged cache (the `paged_attention` op); layout derived once a step."""
        i = self.layer_idx
        kernels = default_kernels()
        plan = batch.cached("attention_plan", lambda: plan_attention(
            batch.query_start.tolist(), batch.context_lens, batch.block_tables,
            cache.block_size)) if kernels == "torch" else None
        context_lens = batch.cached("context_lens", lambda: torch.tensor(
            batch.context_lens, dtype=torch.int32, device=q.device))
        return get_op("paged_attention", kernels)(  # type: ignore[no-any-return]
            q, cache.k[i], cache.v[i], batch.query_start, context_lens, batch.block_tables,
            cache.block_size, attn.scale, attn.window, plan=plan)

    def _cca_decode(
        self, x: torch.Tensor, batch: StepBatch, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv over the cached state, residual paths, QK norm and RoPE for one token per
        sequence, updating the CCA states in place."""
        cca, cfg = self.self_attn.qkv_proj, self.config
        return get_op("cca_decode")(  # type: ignore[no-any-return]
            cca.project(x), cache.conv_state[self.layer_idx], cache.v_state[self.layer_idx],
            batch.state_slots, batch.positions, cca.conv_qk_depthwise.weight,
            cca.conv_qk_depthwise.bias, cca.conv_qk_grouped.weight, cca.conv_qk_grouped.bias,
            self.self_attn.qk_norm.temp, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.rotary_dim(self.layer_type),
            cfg.rope_parameters[self.layer_type].rope_theta)


class ZayaBody(nn.Module):
    """Named `model` in the checkpoint."""

    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(h))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(h))
        self.layers = nn.ModuleList(
            AttentionLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps)


class AttentionSideModel(nn.Module):
    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = ZayaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size,
                                 bias=config.lm_head_bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def initial_v_states(self) -> torch.Tensor:
        """[L, Dv]: the delayed-v each layer's first token sees."""
        return torch.stack([layer.self_attn.qkv_proj.initial_v_state() for layer in self.layers])

    @property
    def layers(self) -> list[AttentionLayer]:
        return list(self.model.layers)  # type: ignore[arg-type]

    def embed(self, batch: StepBatch) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor,
                                                                           torch.Tensor]]]:
        """The fp32 residual stream of the new tokens and the RoPE tables of each layer kind."""
        cfg, body = self.config, self.model
        emb = body.embed_tokens(batch.input_ids)
        ropes = {}
        for kind in self.ropes_kinds():
            theta = cfg.rope_parameters[kind].rope_theta
            ropes[kind] = rope_cos_sin(batch.positions, cfg.rotary_dim(kind), theta, emb.dtype)
        # The residual stream stays fp32 (the reference's residual_in_fp32).
        residual = ((emb + body.input_hidden_states_bias) * body.input_hidden_states_scale).to(
            torch.float32)
        return residual, ropes

    def ropes_kinds(self) -> list[str]:
        """The layer kinds, each with its own RoPE table."""
        return sorted(set(self.config.layer_types))

    def head(self, residual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits [L, V] of the given rows of the residual stream."""
        h = self.model.norm(residual[rows].to(self.dtype))
        return self.lm_head(h).float()

    @torch.inference_mode()
    def forward(
        self, batch: StepBatch, cache: KVCache, experts: ExpertBackend
    ) -> torch.Tensor:
        """Runs the new tokens of every sequence through the model, writing their K/V and CCA
        states; returns fp32 logits [L, V] for the rows in `batch.logits_indices`."""
        residual, ropes = self.embed(batch)
        gate_state: torch.Tensor | None = None
        for layer in self.layers:
            residual, gate_state = layer(
                residual, gate_state, ropes[layer.layer_type], batch, cache, experts)
        return self.head(residual, batch.logits_indices)
