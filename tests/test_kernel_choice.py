"""Which kernel set runs: `ZAYASERVE_KERNELS` (or its earlier name) forces one for every op,
a bad value is refused naming the variable, and unforced a machine without a GPU runs torch."""

from __future__ import annotations

import pytest

from zayaserve.kernels import registry


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (registry.ENV_VAR, registry.OLD_ENV_VAR, "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_unforced_cpu_runs_the_torch_kernels(clean_env: pytest.MonkeyPatch) -> None:
    assert registry.default_kernels() == "torch"
    assert registry.get_op("fused_moe").__module__.endswith("fused_moe_ref")


@pytest.mark.parametrize("name", [registry.ENV_VAR, registry.OLD_ENV_VAR])
def test_either_name_forces_the_set(clean_env: pytest.MonkeyPatch, name: str) -> None:
    clean_env.setenv("TRITON_INTERPRET", "1")  # makes triton usable on this CPU
    clean_env.setenv(name, "torch")
    assert registry.default_kernels() == "torch"
    clean_env.setenv(name, "triton")
    assert registry.default_kernels() == "triton"


def test_a_bad_value_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(registry.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="ZAYASERVE_KERNELS must be 'torch' or 'triton'"):
        registry.default_kernels()
    clean_env.setenv(registry.ENV_VAR, "triton")  # no GPU and no interpreter
    with pytest.raises(ValueError, match="needs a GPU or TRITON_INTERPRET=1"):
        registry.default_kernels()
