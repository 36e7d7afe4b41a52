"""The cluster's configuration: one pydantic model read from YAML, CLI flags or Serve args.

Cluster-level fields sit at the top; everything about how an attention worker's engine runs is
`engine:`, an `EngineSettings` with the names `LLM(...)` takes:

    model: tiny
    expert_shards: 2
    engine: {block_size: 16, kv_cache_redis_url: "redis://redis:6379/0", limits: {max_n: 8}}

The blocks are defined once, each beside the code that reads it, and named here only:

    engine:       EngineSettings     replicas/engine/config.py (also `LLM(...)`'s arguments)
    tracing:      TracingConfig      replicas/observability/tracing.py (every floor traces)
    autoscaling:  AutoscalingConfig  cluster/control/elastic_config.py
    eplb:         EplbConfig         cluster/control/elastic_config.py

Every error names the field by its path, e.g. `engine.block_size: Input should be greater than
or equal to 1` or `expert_replication: must be <= expert_shards (2), got 3`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from zayaserve.cluster.control.elastic_config import AutoscalingConfig, EplbConfig
from zayaserve.cluster.frontend.response_budget import DEFAULT_MAX_RESPONSE_LOGPROBS
from zayaserve.replicas.engine.config import EngineSettings
from zayaserve.replicas.observability.tracing import TracingConfig
from zayaserve.replicas.validation_errors import format_validation_error

# Where the cluster's engine default differs from the engine's own: its experts are usually
# remote, so by default one micro-batch's attention overlaps the other's expert round trip.
CLUSTER_ENGINE_DEFAULTS: dict[str, Any] = {"micro_batches": 2}


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
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig, description="Scale both deployments on load "
        "(`enabled`), each between its `min` and `max`: attention_workers on queues and KV "
        "usage, expert_shards on queued rows and rows/s. The bounds also limit resizes by "
        "hand (widened to hold the deployed counts).")
    eplb: EplbConfig = Field(
        default_factory=EplbConfig, description="Re-place and replicate hot experts from their "
        "observed load (expert shards only).")
    http_host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=0, le=65535, description="Public gRPC port (0: off).")
    api_key: SecretStr | None = Field(
        None, description="A Bearer key REST and gRPC require (prefer api_key_file or the "
        "ZAYASERVE_API_KEY environment variable: a config may be shown).")
    api_key_file: str | None = Field(
        None, description="File of API keys, one per line (e.g. a mounted Kubernetes Secret); "
        "each key is a tenant with its own prefix-cache salt.")
    admin_api_key: SecretStr | None = Field(
        None, description="A Bearer key the admin routes (/v1/cluster/*) require; tenant keys "
        "get 403 there (prefer admin_api_key_file or $ZAYASERVE_ADMIN_API_KEY). With no admin "
        "key, the admin routes answer only to loopback callers.")
    admin_api_key_file: str | None = Field(
        None, description="File of admin keys, one per line (e.g. a mounted Kubernetes Secret).")
    scale_cooldown_s: float = Field(
        30.0, ge=0, description="Least time between two resizes by hand (POST "
        "/v1/cluster/scale): one sooner is a 429 with Retry-After.")
    drain_timeout_s: float = Field(
        300.0, gt=0, description="How long an attention worker being removed (a scale-down) "
        "keeps serving what it holds: new requests go elsewhere at once, streams and RSA runs "
        "in flight finish within this (Serve's graceful_shutdown_timeout_s).")
    migration_limit: int = Field(
        3, ge=0, description="How many times one stream may move to another attention worker "
        "when the worker streaming it dies: it goes on from the tokens its client has, with "
        "exactly the tokens an uninterrupted run gives (greedy and seeded; the ingress seeds "
        "the rest). 0 turns migration off: such a request fails with a 503.")
    max_experts_per_shard: int | None = Field(
        None, ge=1, description="The most experts (each with all its layers) one expert shard "
        "may hold: its memory budget. A resize whose plan would need more on one shard is "
        "refused (409). Each shard also reports what its free memory holds (device memory on "
        "GPUs, available host memory on CPUs); the smaller bound wins.")
    max_response_logprobs: int = Field(
        DEFAULT_MAX_RESPONSE_LOGPROBS, ge=1, description="Logprob entries one response may "
        "carry at worst (prompt positions and max_tokens, times k+1, times n, over its "
        "prompts); a request over it is a 400 before it runs.")
    reasoning_parser: Literal["think"] | None = Field(
        None, description="think: chat answers move <think>...</think> to reasoning_content "
        "(ZAYA1 and Qwen3-style templates).")
    tool_call_parser: Literal["hermes"] | None = Field(
        "hermes", description="How chat replies with tool_choice auto are parsed for calls: "
        "hermes (<tool_call>{...}</tool_call>, Qwen3-style templates); null: auto is refused.")
    strict_request_fields: bool = Field(
        False, description="Refuse REST requests carrying fields the server does not know "
        "(400 naming the field) instead of ignoring them with a logged warning (vLLM's way).")
    metrics_require_api_key: bool = Field(
        False, description="/metrics answers only requests with a valid API key.")
    tracing: TracingConfig = Field(
        default_factory=TracingConfig, description="OpenTelemetry traces (OTLP/gRPC): off "
        "unless an endpoint is set here or in $OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT; unset "
        "fields take the standard OTEL_* variables where the application is built.")
    grpc_tls_cert_file: str | None = Field(
        None, description="PEM certificate: the public gRPC port serves TLS only.")
    grpc_tls_key_file: str | None = Field(None, description="PEM key of grpc_tls_cert_file.")
    engine: EngineSettings = Field(
        default_factory=lambda: EngineSettings(**CLUSTER_ENGINE_DEFAULTS),
        description="How every attention worker's engine runs: EngineSettings, the keyword "
        "arguments of LLM(...). One default differs from the engine's: micro_batches is 2 "
        "(overlap one micro-batch's attention with the other's expert calls) unless set; "
        "`--no-overlap` sets 1. The expert shards use its dtype and num_threads; the request "
        "router its block_size. An EngineSettings object given in Python is used as it is.")
    max_pending_requests: int = Field(
        256, ge=1, description="Requests one attention worker accepts before answering 429.")
    dispatch_deadline_s: float = Field(10.0, gt=0, description="Deadline of one expert call.")
    wait_for_replica_s: float = Field(
        60.0, gt=0, description="How long a dispatch waits for a restarted expert shard.")
    replica_num_cpus: float = Field(
        0.1, gt=0, description="CPUs reserved per replica (fractional on small machines).")
    attention_num_gpus: float = Field(
        0.0, ge=0, description="GPUs per attention worker (fractional shares one GPU); 0 runs "
        "the workers on the CPU. Ray sets CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES.")
    expert_num_gpus: float = Field(
        0.0, ge=0, description="GPUs per expert shard (fractional allowed); 0: the CPU. With "
        "attention_num_gpus, attention and experts can use different GPU pools.")
    attention_ray_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources each attention worker asks "
        "for, e.g. {zayaserve_attention: 1}: ties the workers to the nodes (KubeRay worker "
        "group) that advertise them.")
    expert_ray_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources each expert shard asks for.")
    ingress_ray_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources the ingress (REST and the "
        "public gRPC server) and the placement controller ask for, e.g. {zayaserve_head: 1} "
        "to keep them on the node the Service points at. When set, they ask for no CPU: the "
        "resource places them.")
    routing_imbalance_threshold: int = Field(
        8, ge=0, description="Queue-length gap above which load beats prefix affinity.")
    max_queued_requests: int = Field(
        512, ge=1, description="Requests Serve queues for the attention workers before it "
        "answers 429 / RESOURCE_EXHAUSTED.")
    grpc_max_message_bytes: int = Field(
        4 * 2**20, ge=1024, description="Largest gRPC request message the public API accepts.")
    grpc_max_concurrent_rpcs: int = Field(
        1024, ge=1, description="Public gRPC calls served at once; more are refused "
        "(RESOURCE_EXHAUSTED).")
    shard_max_concurrent_calls: int = Field(
        64, ge=1, description="Calls one expert shard's gRPC port serves at once; more get "
        "RESOURCE_EXHAUSTED (the token router retries them within wait_for_replica_s). At "
        "least attention_workers x engine.micro_batches, the most calls the workers make to "
        "one shard at a time.")
    shard_max_message_bytes: int | None = Field(
        None, ge=1024, description="Largest message between attention workers and expert "
        "shards, either way. Default: what engine.max_num_batched_tokens rows of the model's "
        "hidden size need (float32 rows and weights, int64 ids), plus 25% and 1 MiB.")

    @field_validator("engine", mode="before")
    @classmethod
    def _cluster_engine_defaults(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {**CLUSTER_ENGINE_DEFAULTS, **value}
        return value

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.expert_shards and self.expert_replication > self.expert_shards:
            raise ValueError(f"expert_replication: must be <= expert_shards "
                             f"({self.expert_shards}), got {self.expert_replication}")
        if self.grpc_port and self.grpc_port == self.http_port:
            raise ValueError(f"grpc_port: must differ from http_port ({self.http_port})")
        calls = self.attention_workers * self.engine.micro_batches
        if self.expert_shards and self.shard_max_concurrent_calls < calls:
            raise ValueError(f"shard_max_concurrent_calls: must be >= attention_workers x "
                             f"engine.micro_batches ({calls}), got "
                             f"{self.shard_max_concurrent_calls}")
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    @classmethod
    def create(cls, **values: Any) -> ClusterConfig:
        """Validates `values`; a dotted key is a nested one (`engine.block_size=8`, as
        `serve run ... engine.block_size=8` passes it)."""
        nested: dict[str, Any] = {}
        for key, value in values.items():
            merge_into(nested, _unflatten(key, value))
        try:
            return cls(**nested)
        except ValidationError as err:
            raise ClusterConfigError(format_validation_error(err)) from None

    @classmethod
    def load(cls, file: str | Path | None = None, **overrides: Any) -> ClusterConfig:
        """YAML file values, then non-None overrides (CLI flags) on top; nested mappings
        (`engine={...}`) are merged key by key."""
        values: dict[str, Any] = {}
        if file is not None:
            try:
                loaded = yaml.safe_load(Path(file).read_text()) or {}
            except (OSError, yaml.YAMLError) as err:
                raise ClusterConfigError(f"config file {file}: {err}") from None
            if not isinstance(loaded, dict):
                raise ClusterConfigError(f"config file {file}: expected a mapping at the top")
            merge_into(values, _underscored(loaded))
        merge_into(values, overrides, skip_none=True)
        return cls.create(**values)


def merge_into(base: dict[str, Any], new: Mapping[str, Any], skip_none: bool = False) -> None:
    """Writes `new` into `base`; a mapping meets a mapping key by key, and a pydantic model
    already in `base` is opened into its fields to take nested values."""
    for key, value in new.items():
        if skip_none and value is None:
            continue
        if isinstance(value, Mapping):
            old = base.get(key)
            if isinstance(old, BaseModel):
                old = old.model_dump()
            merged = dict(old) if isinstance(old, dict) else {}
            merge_into(merged, value, skip_none)
            base[key] = merged
        else:
            base[key] = value


def _unflatten(key: str, value: Any) -> dict[str, Any]:
    head, _, rest = key.partition(".")
    return {head: _unflatten(rest, value) if rest else value}


def _underscored(values: Any) -> Any:
    """YAML may spell keys with dashes (`block-size`), as the CLI flags do."""
    if isinstance(values, dict):
        return {str(k).replace("-", "_"): _underscored(v) for k, v in values.items()}
    return values
