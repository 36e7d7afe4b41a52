"""transformers' ZayaForCausalLM as the fidelity oracle (test-only dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def build_hf_checkpoint(path: Path, seed: int = 0, **overrides: Any) -> Any:
    """A small ZAYA config in transformers, randomised so every parameter matters, saved with
    save_pretrained. Returns the (eval, eager-attention) transformers model."""
    from transformers import ZayaConfig, ZayaForCausalLM

    from zayaserve.replicas.model.builtin.random_checkpoint import randomize_hf_model_

    cfg: dict[str, Any] = dict(
        vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=48, num_experts=6,
        router_hidden_size=16, max_position_embeddings=1024, initializer_range=0.4,
        layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=6,
        eos_token_id=5, bos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = ZayaForCausalLM(ZayaConfig(**cfg), attn_implementation="eager").eval()
    randomize_hf_model_(model, seed=seed)
    model.save_pretrained(path)
    return model


@torch.no_grad()
def reference_prompt_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, one full forward. [len(ids) - 1]"""
    logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@torch.no_grad()
def reference_greedy(model: Any, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation by full recompute each step (no cache involved)."""
    seq = list(ids)
    for _ in range(steps):
        logits = model(torch.tensor([seq])).logits[0, -1]
        seq.append(int(torch.argmax(logits)))
    return seq[len(ids):]
