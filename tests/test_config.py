"""One config: the cluster nests the engine's settings (`engine:`) under the names `LLM(...)`
takes, from YAML, CLI flags and Serve args alike; every error names the field by its path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from zayaserve.cluster.cli import build_parser
from zayaserve.cluster.config import ClusterConfig, ClusterConfigError
from zayaserve.cluster.serve_cli import config_from_args
from zayaserve.replicas.engine.config import EngineConfig, EngineSettings
from zayaserve.replicas.model.builtin.presets import preset_config
from zayaserve.replicas.model.config import ConfigError, ZayaConfig


def _serve_args(*argv: str) -> ClusterConfig:
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_engine_config_is_the_settings_plus_the_model() -> None:
    assert set(EngineConfig.model_fields) == set(EngineSettings.model_fields) | {"model"}
    assert "model" not in EngineSettings.model_fields


def test_cluster_engine_defaults_are_the_engines_but_overlap() -> None:
    cfg = ClusterConfig()
    assert cfg.engine == EngineSettings(micro_batches=2)
    assert cfg.engine.kv_cache_memory_gb == EngineSettings().kv_cache_memory_gb
    # Setting any engine value keeps the cluster's overlap default.
    assert ClusterConfig.create(engine={"block_size": 8}).engine.micro_batches == 2
    assert ClusterConfig.create(engine={"micro_batches": 1}).engine.micro_batches == 1
    # An EngineSettings object is taken as it is.
    assert ClusterConfig(engine=EngineSettings(block_size=8)).engine.micro_batches == 1


def test_nested_yaml(tmp_path: Path) -> None:
    file = tmp_path / "cluster.yaml"
    file.write_text(yaml.safe_dump({
        "model": "tiny", "expert-shards": 1,
        "engine": {"block-size": 8, "kv_cache_redis_url": "redis://r:6379/0",
                   "kv_cache_ttl_s": 60, "limits": {"max_n": 4}}}))
    cfg = ClusterConfig.load(file)
    assert cfg.expert_shards == 1
    e = cfg.engine
    assert (e.block_size, e.kv_cache_redis_url, e.kv_cache_ttl_s) == (8, "redis://r:6379/0", 60)
    assert e.limits.max_n == 4 and e.limits.max_prompts_per_request == 64
    assert e.micro_batches == 2
    # What a worker builds its engine from.
    engine = EngineConfig(model="ckpt", **e.model_dump())
    assert engine.block_size == 8 and engine.limits.max_n == 4 and engine.model == "ckpt"


def test_flags_map_onto_engine_and_override_yaml(tmp_path: Path) -> None:
    file = tmp_path / "cluster.yaml"
    file.write_text("model: tiny\nengine:\n  block_size: 4\n  kv_cache_encoding: fp8\n"
                    "  kv_cache_redis_url: redis://yaml:6379/0\n")
    cfg = _serve_args("--config", str(file), "--redis-url", "redis://flag:6379/0",
                      "--no-overlap", "--expert-shards", "3")
    e = cfg.engine
    assert (e.kv_cache_redis_url, e.micro_batches) == ("redis://flag:6379/0", 1)
    assert (e.block_size, e.kv_cache_encoding) == (4, "fp8")  # flags not given keep YAML's
    assert cfg.expert_shards == 3
    cfg = _serve_args("--config", str(file), "--kv-cache-encoding", "int8")
    assert cfg.engine.kv_cache_encoding == "int8" and cfg.engine.micro_batches == 2
    assert cfg.engine.kv_cache_redis_url == "redis://yaml:6379/0"
    assert _serve_args().engine == EngineSettings(micro_batches=2)


def test_dotted_serve_args() -> None:
    # `serve run zayaserve.cluster.app:build_app model=tiny engine.block_size=8` passes strings.
    cfg = ClusterConfig.create(**{"model": "tiny", "engine.block_size": "8",
                                  "engine.limits.max_n": "2", "expert_shards": "0"})
    assert cfg.engine.block_size == 8 and cfg.engine.limits.max_n == 2
    assert cfg.expert_shards == 0 and cfg.engine.micro_batches == 2
    both = ClusterConfig.create(engine={"seed": 3}, **{"engine.block_size": 2})
    assert (both.engine.seed, both.engine.block_size) == (3, 2)


@pytest.mark.parametrize(("values", "message"), [
    (dict(engine={"block_size": 0}),
     "engine.block_size: Input should be greater than or equal to 1"),
    (dict(engine={"micro_batches": 9}),
     "engine.micro_batches: Input should be less than or equal to 8"),
    (dict(engine={"limits": {"max_n": 0}}),
     "engine.limits.max_n: Input should be greater than or equal to 1"),
    (dict(engine={"redis_url": "redis://x"}), "engine.redis_url: Extra inputs are not permitted"),
    ({"engine.block_sise": "8"}, "engine.block_sise: Extra inputs are not permitted"),
    (dict(block_size=8), "block_size: Extra inputs are not permitted"),  # the old flat name
    (dict(engine="fast"), "engine: Input should be a valid dictionary or instance of Engine"),
    (dict(expert_shards=2, expert_replication=3),
     "expert_replication: must be <= expert_shards (2), got 3"),
])
def test_errors_name_the_field_path(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ClusterConfigError) as info:
        ClusterConfig.create(**values)
    assert str(info.value).startswith(message), str(info.value)


def test_unknown_nested_yaml_key_is_refused_by_name(tmp_path: Path) -> None:
    file = tmp_path / "cluster.yaml"
    file.write_text("engine:\n  block_size: 8\n  kv_cache_mem_gb: 4\n")
    with pytest.raises(ClusterConfigError, match=r"^engine\.kv_cache_mem_gb: Extra inputs"):
        ClusterConfig.load(file)


def test_every_problem_is_reported() -> None:
    with pytest.raises(ClusterConfigError) as info:
        ClusterConfig.create(attention_workers=0, engine={"max_num_seqs": 0})
    msg = str(info.value)
    assert "attention_workers: " in msg and "; engine.max_num_seqs: " in msg


def test_engine_and_model_configs_use_the_same_formatter() -> None:
    with pytest.raises(ValueError, match=r"^block_size: Input should be greater than or equal"):
        EngineConfig.create(model="ckpt", block_size=0)
    with pytest.raises(ValueError, match=r"^limits\.max_n: Input should be greater"):
        EngineConfig.create(model="ckpt", limits={"max_n": 0})
    base = preset_config("tiny")
    with pytest.raises(ConfigError, match=r"^config: hidden_size: "):
        ZayaConfig.from_dict({**base, "hidden_size": "big"})
    with pytest.raises(ConfigError, match=r"^config: num_attention_heads must be a multiple"):
        ZayaConfig.from_dict({**base, "num_attention_heads": 3, "num_key_value_heads": 2})


def test_printed_serve_config_is_valid_for_serve_and_keeps_secrets_out(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`zayaserve serve --print-serve-config` is the `serve deploy` file (no hand-written copy
    to drift): Ray Serve's schema and ClusterConfig both accept it; secrets are left out."""
    from ray.serve.schema import ServeDeploySchema

    from zayaserve.cluster.cli import main

    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text(yaml.safe_dump({
        "expert_shards": 3, "api_key": "sk-do-not-print", "eplb": {"enabled": True},
        "engine": {"kv_cache_secret": "do-not-print-either", "block_size": 8}}))
    assert main(["serve", "--config", str(cluster_yaml), "--model", "tiny",
                 "--max-expert-shards", "6", "--print-serve-config"]) == 0
    out = capsys.readouterr().out
    assert "do-not-print" not in out
    doc = yaml.safe_load(out)
    ServeDeploySchema.model_validate(doc)
    args = doc["applications"][0]["args"]
    cfg = ClusterConfig.create(**args)
    assert (cfg.model, cfg.expert_shards, cfg.engine.block_size) == ("tiny", 3, 8)
    assert cfg.eplb.enabled and cfg.autoscaling.expert_shards.max == 6
    assert cfg.engine.micro_batches == 2 and cfg.api_key is None


def test_ray_resources_pin_each_deployment() -> None:
    from zayaserve.cluster.app import build_app

    cfg = ClusterConfig.create(model="tiny", expert_shards=2,
                               attention_ray_resources={"zayaserve_attention": 1},
                               expert_ray_resources={"zayaserve_experts": 1},
                               ingress_ray_resources={"zayaserve_head": 1})
    ingress = build_app(cfg)._bound_deployment
    workers, controller, shards, _ = ingress.init_args

    def actor(bound: Any) -> dict[str, Any]:
        return dict(bound._bound_deployment.ray_actor_options)

    assert ingress.ray_actor_options == {"num_cpus": 0, "resources": {"zayaserve_head": 1}}
    assert actor(controller)["resources"] == {"zayaserve_head": 1}
    assert actor(workers)["resources"] == {"zayaserve_attention": 1}
    assert actor(shards)["resources"] == {"zayaserve_experts": 1}
    assert actor(shards)["num_cpus"] == cfg.replica_num_cpus
