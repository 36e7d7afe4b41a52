"""Typed ZAYA1 model config, read from a transformers-layout `config.json`.

Every size the model code uses comes from here; nothing assumes ZAYA1-8B's numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from zayaserve.replicas.validation_errors import format_validation_error

LayerType = Literal["hybrid", "hybrid_sliding"]

DEFAULT_ROPE: dict[str, dict[str, Any]] = {
    "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {
        "rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
}


class ConfigError(ValueError):
    """A checkpoint config is unusable; the message names the field."""


class RopeParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    rope_type: Literal["default"] = Field("default", description="Only plain RoPE is supported.")
    rope_theta: float = Field(gt=0, description="RoPE base frequency.")
    partial_rotary_factor: float = Field(
        1.0, gt=0, le=1, description="Fraction of head_dim that is rotated."
    )


class ZayaConfig(BaseModel):
    """The fields of transformers' `ZayaConfig` that change the computation."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model_type: Literal["zaya"] = Field(description="Must be 'zaya'.")
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    hidden_act: Literal["silu"] = "silu"
    max_position_embeddings: int = Field(gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    tie_word_embeddings: bool = True
    rope_parameters: dict[str, RopeParams] = Field(default_factory=dict)
    sliding_window: int | None = Field(None, gt=0)
    moe_intermediate_size: int = Field(gt=0)
    num_experts_per_tok: int = Field(1, description="ZAYA routes each token to one expert.")
    num_experts: int = Field(gt=0)
    layer_types: list[LayerType] = Field(default_factory=list)
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 106
    attention_bias: bool = False
    lm_head_bias: bool = False
    router_hidden_size: int = Field(gt=0)
    cca_time0: int = Field(2, ge=1)
    cca_time1: int = Field(2, ge=1)
    dtype: str | None = Field(None, description="Checkpoint dtype as saved by transformers.")

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if not data.get("layer_types") and "num_hidden_layers" in data:
            data["layer_types"] = ["hybrid"] * int(data["num_hidden_layers"])
        rope = data.get("rope_parameters")
        if not rope:
            data["rope_parameters"] = DEFAULT_ROPE
        elif isinstance(rope, dict):
            # Hub configs carry a stray top-level `rope_type` next to the per-layer-type dicts.
            data["rope_parameters"] = {k: v for k, v in rope.items() if isinstance(v, dict)}
        if data.get("dtype") is None and "torch_dtype" in data:
            data["dtype"] = data["torch_dtype"]
        return data

    @model_validator(mode="after")
    def _check_architecture(self) -> ZayaConfig:
        if self.num_experts_per_tok != 1:
            raise ValueError("num_experts_per_tok: ZAYA routes top-1, got "
                             f"{self.num_experts_per_tok}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, "
                             f"num_hidden_layers is {self.num_hidden_layers}")
        if "hybrid_sliding" in self.layer_types and self.sliding_window is None:
            raise ValueError("sliding_window must be set when layer_types has 'hybrid_sliding'")
        for kind in set(self.layer_types):
            if kind not in self.rope_parameters:
                raise ValueError(f"rope_parameters has no entry for layer type {kind!r}")
        if (self.num_key_value_heads * self.head_dim) % 2:
            raise ValueError("num_key_value_heads * head_dim must be even (v is split in halves)")
        return self

    # Derived sizes, named once so the model code reads like the paper.
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        return self.q_size + self.kv_size

    @property
    def conv_state_len(self) -> int:
        """Columns of pre-conv q|k kept per sequence so a later chunk continues the conv."""
        return (self.cca_time0 - 1) + (self.cca_time1 - 1)

    @property
    def v_state_size(self) -> int:
        return self.kv_size // 2

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def rotary_dim(self, layer_type: str) -> int:
        return int(self.head_dim * self.rope_parameters[layer_type].partial_rotary_factor)

    def window(self, layer_idx: int) -> int | None:
        """Sliding window of a layer (None for full attention)."""
        return self.sliding_window if self.layer_types[layer_idx] == "hybrid_sliding" else None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ZayaConfig:
        if data.get("model_type") != "zaya":
            raise ConfigError(
                f"{source}: model_type must be 'zaya', got {data.get('model_type')!r}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(f"{source}: {format_validation_error(err)}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ZayaConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file}: no config.json in the checkpoint folder")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a JSON object")
        return cls.from_dict(data, source=str(file))
