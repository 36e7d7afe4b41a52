"""The autoscaling config (`autoscaling:` in ClusterConfig): its defaults are valid and off, and
every bad value is refused with a message naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from zayaserve.cluster.control.elastic_config import AutoscalingConfig
from zayaserve.replicas.validation_errors import format_validation_error


@pytest.mark.parametrize(("fields", "message"), [
    ({"attention_workers": {"min": 3, "max": 2}},
     "attention_workers: max: must be >= min (3), got 2"),
    ({"expert_shards": {"min": -1}}, "expert_shards.min: Input should be greater than or equal"),
    ({"expert_shards": {"upscale_delay_s": -1}}, "expert_shards.upscale_delay_s: "),
    ({"attention_workers": {"downscale_delay_s": -5}}, "attention_workers.downscale_delay_s: "),
    ({"attention_workers": {"max_kv_usage": 1.5}}, "attention_workers.max_kv_usage: "),
    ({"attention_workers": {"target_waiting_per_worker": 0}},
     "attention_workers.target_waiting_per_worker: "),
    ({"attention_workers": {"max_ttft_s": 0}}, "attention_workers.max_ttft_s: "),
    ({"expert_shards": {"target_queue_per_shard": 0}}, "expert_shards.target_queue_per_shard: "),
    ({"expert_shards": {"max_rows_per_s_per_shard": -1}},
     "expert_shards.max_rows_per_s_per_shard: "),
    ({"attention_workers": {"mni": 1}}, "attention_workers.mni: Extra inputs are not permitted"),
    ({"attention_workers_per_shard": 1, "attention_workers": {"max": 8},
      "expert_shards": {"max": 4}},
     "attention_workers_per_shard: 1 needs 8 shards at attention_workers.max (8), above "
     "expert_shards.max (4)"),
])
def test_config_errors_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        AutoscalingConfig.model_validate(fields)
    assert message in format_validation_error(err.value)


def test_defaults_are_valid_and_off() -> None:
    cfg = AutoscalingConfig()
    assert not cfg.enabled
    assert (cfg.attention_workers.min, cfg.attention_workers.max) == (1, 4)
    assert cfg.expert_shards.target_queue_per_shard == 64
