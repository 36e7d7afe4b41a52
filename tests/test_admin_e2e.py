"""The admin role on a real local Ray Serve: tenant keys get 403 on the admin routes and the
admin key 202; a resize that would overfill a shard is a 409 and one within the cooldown a 429
with Retry-After; with no admin key (the chart's tenant-less default) a caller from outside
the server's loopback (a network namespace of the test's own) is refused while loopback
callers, `zayaserve scale` among them, work. Serve's proxy is bound to 0.0.0.0 for this module
and shut down after it, so later modules start theirs as before."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from cluster_harness import Cluster, deploy, undeploy
from netns_client import RemoteCaller, remote_caller

from zayaserve.cluster.cli import main as cli_main

pytestmark = pytest.mark.e2e
TENANT, ADMIN = "tenant-key-0001", "admin-key-00001"
SCALE = "/v1/cluster/scale"


@pytest.fixture(scope="module")
def outside(ray_session: None) -> Iterator[RemoteCaller]:
    from ray import serve

    serve.shutdown()  # Serve's proxy keeps its first host: start it anew on 0.0.0.0
    with remote_caller() as caller:
        yield caller
    serve.shutdown()


def _post(c: Cluster, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(c.base + SCALE, json=body, headers=headers, timeout=60)


def test_tenant_keys_are_refused_and_the_admin_key_resizes(outside: RemoteCaller) -> None:
    c = deploy(expert_shards=2, expert_replication=1, http_host="0.0.0.0", api_key=TENANT,
               admin_api_key=ADMIN, scale_cooldown_s=600, max_experts_per_shard=6)
    try:
        assert _post(c, {"expert_shards": 3}).status_code == 401
        tenant = _post(c, {"expert_shards": 3}, TENANT)
        assert tenant.status_code == 403, tenant.text
        assert tenant.json()["error"]["code"] == "permission_denied"
        assert httpx.get(c.base + "/v1/cluster/placement", timeout=30,
                         headers={"Authorization": f"Bearer {TENANT}"}).status_code == 403
        # Tenants still generate.
        r = httpx.post(c.base + "/v1/completions", timeout=60,
                       headers={"Authorization": f"Bearer {TENANT}"},
                       json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        # 2 -> 1 would first copy all 8 experts onto each shard: over the budget of 6.
        full = _post(c, {"expert_shards": 1}, ADMIN)
        assert full.status_code == 409 and full.json()["error"]["param"] == "expert_shards"
        assert "max_experts_per_shard" in full.json()["error"]["message"], full.text
        grow = _post(c, {"expert_shards": 3}, ADMIN)
        assert grow.status_code == 202, grow.text
        again = _post(c, {"expert_shards": 3}, ADMIN)  # the running one: not rate-limited
        assert again.status_code == 200, again.text
        # An admin key from outside the loopback is still the admin.
        status, text = outside.request("GET", c.cfg.http_port, "/v1/cluster/placement",
                                       {"Authorization": f"Bearer {ADMIN}"})
        assert status == 200, text
        cli = httpx.get(f"{c.base}/v1/cluster/operations/{grow.json()['operation']['id']}",
                        headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
        assert cli.status_code == 200
    finally:
        undeploy()


def test_without_an_admin_key_only_loopback_callers_operate(outside: RemoteCaller) -> None:
    c = deploy(expert_shards=2, expert_replication=1, http_host="0.0.0.0", scale_cooldown_s=600)
    try:
        status, text = outside.request("POST", c.cfg.http_port, SCALE,
                                       body={"expert_shards": 3})
        assert status == 403 and "loopback" in text, text
        status, text = outside.request("GET", c.cfg.http_port, "/v1/cluster/placement")
        assert status == 403, text
        # The same caller may still generate (no tenant keys: the API is open).
        status, text = outside.request("POST", c.cfg.http_port, "/v1/completions",
                                       body={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert status == 200, text
        # On the loopback, `zayaserve scale` needs no key.
        assert cli_main(["scale", "--expert-shards", "3", "--url", c.base, "--wait",
                         "--timeout", "240"]) == 0
        soon = _post(c, {"expert_shards": 2})
        assert soon.status_code == 429 and int(soon.headers["Retry-After"]) > 500, soon.text
    finally:
        undeploy()
