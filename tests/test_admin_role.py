"""The admin role, piece by piece: admin keys load from the config, a file and the variable,
and never equal a tenant key; the admin routes' answers by caller (no key 401, tenant key 403,
admin key 200; without an admin key, loopback peers only, whatever headers say); a resize that
would overfill a shard is refused and one within the cooldown is too soon; `zayaserve scale
--wait` waits a cooldown out. Over real Ray Serve: tests/test_admin_e2e.py."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from zayaserve.cluster.control.admin_auth import ADMIN_ENV_VAR, load_admin_keys
from zayaserve.cluster.control.placement_state import ExpertPlacement
from zayaserve.cluster.control.scale_ops import (
    ScaleOperations,
    ScaleRefused,
    ScaleTooSoon,
    peak_experts_per_shard,
)
from zayaserve.cluster.frontend.openai_api import build_openai_app

TENANT, ADMIN = "tenant-key-0001", "admin-key-00001"
PLACEMENT = "/v1/cluster/placement"


def test_admin_keys_come_from_config_file_and_variable(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "admin"
    keys.write_text("# operators\nfile-admin-key\n")
    monkeypatch.setenv(ADMIN_ENV_VAR, "env-admin-key1,env-admin-key2")
    assert load_admin_keys("config-admin-key", str(keys)) == [
        "config-admin-key", "file-admin-key", "env-admin-key1", "env-admin-key2"]
    with pytest.raises(ValueError, match="admin_api_key: an admin key must not also be a tenant"):
        load_admin_keys("shared-key-1234", None, ["shared-key-1234"])
    with pytest.raises(ValueError, match="admin_api_key_file: cannot read"):
        load_admin_keys(None, str(tmp_path / "missing"))
    monkeypatch.setenv(ADMIN_ENV_VAR, "short")
    with pytest.raises(ValueError, match="admin_api_key: keys must be at least 8"):
        load_admin_keys(None, None)


def _get(app: Any, peer: str, key: str | None = None, path: str = PLACEMENT,
         **headers: str) -> httpx.Response:
    """A request from `peer` as the ASGI server reports it (no network involved)."""
    if key:
        headers["Authorization"] = f"Bearer {key}"

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://zs") as client:
            return await client.get(path, headers=headers)
    return asyncio.run(call())


@pytest.mark.parametrize("peer", ["127.0.0.1", "203.0.113.9"])
def test_with_an_admin_key_only_it_operates(engine_client: Any, peer: str) -> None:
    app = build_openai_app(engine_client, api_keys=[TENANT], admin_api_keys=[ADMIN])
    assert (_get(app, peer)).status_code == 401
    assert (_get(app, peer, "wrong-key-000")).status_code == 401
    tenant = _get(app, peer, TENANT)
    assert tenant.status_code == 403 and tenant.json()["error"]["code"] == "permission_denied"
    assert (_get(app, peer, ADMIN)).status_code == 200


def test_without_an_admin_key_only_loopback_peers_operate(engine_client: Any) -> None:
    app = build_openai_app(engine_client, api_keys=[TENANT])
    for peer in ("127.0.0.1", "::1", "127.0.0.53"):
        assert (_get(app, peer)).status_code == 200, peer
    for peer in ("203.0.113.9", "10.0.0.7", "::ffff:10.0.0.7"):
        r = _get(app, peer, TENANT, **{"X-Forwarded-For": "127.0.0.1"})
        assert r.status_code == 403 and "admin_api_key_file" in r.json()["error"]["message"]
    # Generation keeps its own rule: the tenant key, from anywhere.
    assert _get(app, "203.0.113.9", TENANT, "/v1/models").status_code == 200


def test_peak_experts_per_shard() -> None:
    assert peak_experts_per_shard(16, 4, 8, 1) == 2  # growing: what the targets hold
    assert peak_experts_per_shard(16, 4, 3, 1) == 8  # cover 2 copies on 4 shards
    assert peak_experts_per_shard(16, 4, 2, 1) == 12  # cover 3 copies on 4 shards
    assert peak_experts_per_shard(16, 4, 1, 1) == 16  # everything on the survivor
    assert peak_experts_per_shard(16, 4, 2, 2) == 16


def _ops(num_experts: int = 8, shards: int = 4) -> ScaleOperations:
    placement = ExpertPlacement(num_experts, shards, 1)
    for i, slot in enumerate(list(placement.slots)):
        placement.claim(f"r{i}", 0.0)
        placement.register(f"r{i}", slot, f"a{i}", placement.hold(slot, 0.0), 0.0)
    return ScaleOperations(placement, (1, 8), (1, 4), lambda now: 1)


def test_a_scale_down_that_would_overfill_a_shard_is_refused() -> None:
    ops = _ops()
    with pytest.raises(ScaleRefused, match="expert_shards: resizing to 1 .* 8 experts"):
        ops.start(1, None, 1.0, 1.0, budget=6)
    assert not ops.busy()
    op, created = ops.start(3, None, 1.0, 1.0, budget=6)  # cover: 2 copies on 4 -> 4 each
    assert created and op["phase"] in ("preparing", "committing")


def test_resizes_by_hand_wait_for_the_cooldown() -> None:
    ops = _ops()
    op, _ = ops.start(None, 2, 10.0, 10.0, cooldown_s=30)
    assert ops.start(None, 2, 11.0, 11.0, cooldown_s=30) == (op, False)  # the same: no limit
    ops.current = None  # it finished
    with pytest.raises(ScaleTooSoon) as err:
        ops.start(None, 3, 20.0, 20.0, cooldown_s=30)
    assert err.value.retry_after_s == pytest.approx(20.0)
    ops.start(None, 3, 40.5, 40.5, cooldown_s=30)


def test_scale_wait_waits_out_the_cooldown(monkeypatch: pytest.MonkeyPatch) -> None:
    from zayaserve.cluster import scale_cli

    answers = [(429, {"error": {"message": "too soon"}, "retry_after_s": 1}),
               (202, {"operation": {"id": "op1", "phase": "done", "detail": "done"}})]
    calls: list[Any] = []
    monkeypatch.setattr(scale_cli, "_call", lambda *a: calls.append(a) or answers.pop(0))
    monkeypatch.setattr(scale_cli.time, "sleep", lambda s: calls.append(("sleep", s)))
    args = argparse.Namespace(expert_shards=3, attention_workers=None, url="http://x",
                              api_key_file=None, wait=True, timeout=60.0)
    assert scale_cli.run_scale(args) == 0
    assert ("sleep", 1) in calls and not answers
