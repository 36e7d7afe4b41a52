"""Engine settings, validated at the boundary (LLM kwargs, CLI flags, Serve args)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from zayaserve.replicas.engine.device import DEVICE_PATTERN
from zayaserve.replicas.validation_errors import format_validation_error


class RequestLimits(BaseModel):
    """What one request may ask for: checked when it is added, before it costs anything. Each
    refusal is a 4xx / INVALID_ARGUMENT naming the request field and this limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_n: int = Field(16, ge=1, description="Most completions (`n`) one request may ask for.")
    max_temperature: float = Field(
        100.0, gt=0, description="Highest sampling temperature a request may set.")
    max_stop_strings: int = Field(16, ge=0, description="Most `stop` strings per request.")
    max_stop_string_chars: int = Field(
        256, ge=1, description="Longest `stop` string, in characters.")
    max_stop_token_ids: int = Field(1024, ge=0, description="Most `stop_token_ids` per request.")
    max_prompts_per_request: int = Field(
        64, ge=1, description="Most prompts in one completions request (a list of prompts).")
    max_rsa_tokens: int = Field(
        16_000_000, ge=1, description="Most tokens (prompts and completions over every call, "
        "each call assumed to use its whole max tokens) one RSA request may cost; Zyphra's "
        "default settings (N=32, T=8) come to about 12 million.")
    max_rsa_calls_per_round: int = Field(
        64, ge=1, description="Most calls in one RSA round (`rsa.n` and `rsa.final_n`).")
    max_concurrent_rsa_runs: int = Field(
        4, ge=1, description="RSA runs one attention worker holds at once; one more is "
        "refused (429). Their rounds' queue reservations together never take more than half "
        "of max_pending_requests: ordinary requests keep the rest.")
    rsa_timeout_s: float = Field(
        1800.0, gt=0, description="An RSA run's deadline from its start; past it every call is "
        "aborted and the run ends with an error (408).")
    max_rsa_runs_per_tenant: int = Field(
        2, ge=1, description="RSA runs one API key may have at once on a front end (with API "
        "keys only); one more is refused (429).")
    max_grammar_compile_s: float = Field(
        10.0, gt=0, description="Longest a structured-output constraint may take to compile "
        "(once, when its request arrives, never on the engine's step thread): a slower one is "
        "a 400 naming `structured_outputs`, and its compile, which cannot be stopped, ends in "
        "the background holding one compile worker.")
    max_concurrent_grammar_compiles: int = Field(
        2, ge=1, description="Compile workers: most distinct constraints compiling at once "
        "(requests with the same constraint share its compile). A request whose compile "
        "finds none free within max_grammar_compile_s is refused as overloaded (429).")


class EngineSettings(BaseModel):
    """How an engine runs, whatever model it serves: `LLM(model, **settings)`'s keyword
    arguments, and `engine:` of the cluster's config (the same names everywhere)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field(
        "auto", pattern=DEVICE_PATTERN,
        description="auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N.")
    dtype: str = Field(
        "auto", description="float32, bfloat16, float16, or auto (bfloat16 on a GPU, float32 "
        "on the CPU).")
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV-cache block.")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences running at once.")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Token budget of one engine step (prefill chunks + decodes).")
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + output; defaults to the model's limit.")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="Exact KV block count (overrides kv_cache_memory_gb).")
    kv_cache_memory_gb: float = Field(2.0, gt=0, description="Memory for the KV cache.")
    seed: int = Field(0, description="Seed of the sampler for requests without their own.")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse cached KV blocks (with their CCA states) of shared prefixes.")
    kv_cache_redis_url: str | None = Field(
        None, description="redis:// or rediss:// URL of the shared L2 prefix cache.")
    kv_cache_encoding: str = Field(
        "none", pattern="^(none|int8|fp8)$",
        description="How K/V are stored in L2: none (exact), int8 or fp8 (per block and head).")
    kv_cache_secret: SecretStr | None = Field(
        None, min_length=16, description="Key of the HMAC that authenticates every L2 entry "
        "(default: env ZAYASERVE_KV_CACHE_SECRET; else one generated per deployment, so "
        "entries do not outlive it). Never logged.")
    kv_cache_ttl_s: int | None = Field(3600, ge=1, description="Lifetime of an L2 entry.")
    micro_batches: int = Field(
        1, ge=1, le=8, description="N > 1 splits each step into N micro-batches on N threads: "
        "the others' attention overlaps one's expert round trip (useful with remote experts).")

    async_scheduling: bool = Field(
        True, description="Schedule the next decode step while the current one runs on the "
        "device (outputs are the same as without).")
    output_thread: bool = Field(
        False, description="Detokenize, cut stop strings and make outputs on a thread of "
        "their own, off the step loop (same tokens and text as without). Off by default: in "
        "one CPython process it competes with the step for the GIL, which cost 7-13 points "
        "of device busy in bench/host_path.py.")
    enforce_eager: bool = Field(
        False, description="Run decode steps eagerly instead of replaying captured CUDA/HIP "
        "graphs (graphs are used on a GPU only).")
    max_seq_len_to_capture: int = Field(
        8192, ge=1, description="Longest context a graph-replayed decode step may hold; a "
        "step with a longer sequence runs eagerly.")

    limits: RequestLimits = Field(
        default_factory=lambda: RequestLimits.model_validate({}), description="Per-request limits.")


class EngineConfig(EngineSettings):
    """EngineSettings plus the checkpoint they apply to: what LLMEngine is built from."""

    model: str = Field(description="Checkpoint folder (transformers layout).")

    @classmethod
    def create(cls, **kwargs: Any) -> EngineConfig:
        """Validates, raising a ValueError that names every bad field (`block_size: ...`)."""
        try:
            return cls(**kwargs)
        except ValidationError as err:
            raise ValueError(format_validation_error(err)) from None
