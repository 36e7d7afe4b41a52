"""The cluster's configuration: one pydantic model read from YAML, CLI flags or Serve args.

Every error names the field, e.g. `expert_replication: must be <= expert_shards (2), got 3`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from zayaserve.replicas.engine.config import RequestLimits


class ClusterConfigError(ValueError):
    pass


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("tiny", description="Checkpoint folder, or a built-in name (tiny, small).")
    served_model_name: str | None = Field(
        None, description="Name clients use in `model`; defaults to the folder/preset name.")
    attention_workers: int = Field(1, ge=1, description="AttentionWorker replicas.")
    expert_shards: int = Field(
        2, ge=0, description="ExpertShard replicas (0: experts stay inside the workers).")
    expert_replication: int = Field(1, ge=1, description="Shards holding each expert.")
    http_host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=0, le=65535, description="Public gRPC port (0: off).")
    api_key: str | None = Field(None, description="Bearer key required by REST and gRPC.")
    dtype: str = Field("auto", description="float32, bfloat16, float16 or auto.")
    block_size: int = Field(16, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    kv_cache_memory_gb: float = Field(1.0, gt=0)
    max_pending_requests: int = Field(
        256, ge=1, description="Requests one attention worker accepts before answering 429.")
    micro_batch_overlap: bool = Field(
        True, description="Overlap one micro-batch's attention with the other's expert calls.")
    dispatch_deadline_s: float = Field(10.0, gt=0, description="Deadline of one expert call.")
    wait_for_replica_s: float = Field(
        60.0, gt=0, description="How long a dispatch waits for a restarted expert shard.")
    replica_num_cpus: float = Field(
        0.1, gt=0, description="CPUs reserved per replica (fractional on small machines).")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per replica.")
    seed: int = Field(0)
    enable_prefix_caching: bool = Field(True, description="Reuse cached prefix blocks (L1).")
    redis_url: str | None = Field(
        None, description="redis:// or rediss:// URL of the shared L2 prefix cache.")
    kv_cache_encoding: str = Field(
        "none", pattern="^(none|int8|fp8)$", description="L2 encoding of K/V blocks.")
    routing_imbalance_threshold: int = Field(
        8, ge=0, description="Queue-length gap above which load beats prefix affinity.")
    limits: RequestLimits = Field(
        default_factory=lambda: RequestLimits.model_validate({}),
        description="Per-request limits (max_n, max_temperature, stop counts, prompts).")
    max_queued_requests: int = Field(
        512, ge=1, description="Requests Serve queues for the attention workers before it "
        "answers 429 / RESOURCE_EXHAUSTED.")
    grpc_max_message_bytes: int = Field(
        4 * 2**20, ge=1024, description="Largest gRPC request message the public API accepts.")
    grpc_max_concurrent_rpcs: int = Field(
        1024, ge=1, description="Public gRPC calls served at once; more are refused "
        "(RESOURCE_EXHAUSTED).")

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.expert_shards and self.expert_replication > self.expert_shards:
            raise ValueError(f"expert_replication: must be <= expert_shards "
                             f"({self.expert_shards}), got {self.expert_replication}")
        if self.grpc_port and self.grpc_port == self.http_port:
            raise ValueError(f"grpc_port: must differ from http_port ({self.http_port})")
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    def engine_kwargs(self) -> dict[str, Any]:
        """EngineConfig fields for an attention worker."""
        return dict(dtype=self.dtype, block_size=self.block_size, max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_num_batched_tokens,
                    max_model_len=self.max_model_len,
                    kv_cache_memory_gb=self.kv_cache_memory_gb, seed=self.seed,
                    num_threads=self.torch_threads,
                    micro_batches=2 if self.micro_batch_overlap else 1,
                    enable_prefix_caching=self.enable_prefix_caching,
                    kv_cache_redis_url=self.redis_url,
                    kv_cache_encoding=self.kv_cache_encoding,
                    limits=self.limits.model_dump())

    @classmethod
    def create(cls, **values: Any) -> ClusterConfig:
        try:
            return cls(**values)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: "
                f"{str(e['msg']).removeprefix('Value error, ')}" for e in err.errors())
            raise ClusterConfigError(problems) from None

    @classmethod
    def load(cls, file: str | Path | None = None, **overrides: Any) -> ClusterConfig:
        """YAML file values, then non-None overrides (CLI flags) on top."""
        values: dict[str, Any] = {}
        if file is not None:
            try:
                loaded = yaml.safe_load(Path(file).read_text()) or {}
            except (OSError, yaml.YAMLError) as err:
                raise ClusterConfigError(f"config file {file}: {err}") from None
            if not isinstance(loaded, dict):
                raise ClusterConfigError(f"config file {file}: expected a mapping at the top")
            values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.create(**values)
