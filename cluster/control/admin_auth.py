"""Who may operate the cluster: the admin routes (`/v1/cluster/*`: resize, operations, the
placement view with its shard addresses) answer to admin keys, never to tenant keys.

Admin keys come from `admin_api_key`, `admin_api_key_file` (one per line, e.g. a mounted
Kubernetes Secret) and `$ZAYASERVE_ADMIN_API_KEY` (comma-separated), and must differ from every
tenant key. A tenant key on an admin route is a 403; no key or a wrong one a 401. With no admin
key configured, the admin routes answer only to callers on the ingress's own loopback (the
embedded `zayaserve serve` and `zayaserve scale` on the same host), and refuse everyone else
with a 403 that says how to configure one. The caller's address is the connection's peer as
the server saw it, never a header a client could write."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from starlette.requests import Request

from zayaserve.cluster.frontend.api_keys import ApiKeys, load_api_keys
from zayaserve.cluster.frontend.frontend_errors import AuthenticationError, PermissionDeniedError

ADMIN_ENV_VAR = "ZAYASERVE_ADMIN_API_KEY"


def load_admin_keys(admin_api_key: str | None, admin_api_key_file: str | None,
                    tenant_keys: Iterable[str] = ()) -> list[str]:
    """Every configured admin key; one that is also a tenant key is a config error."""
    keys = load_api_keys(admin_api_key, admin_api_key_file, ADMIN_ENV_VAR, "admin_api_key")
    if set(keys) & set(tenant_keys):
        raise ValueError("admin_api_key: an admin key must not also be a tenant key (api_key)")
    return keys


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminAuth:
    def __init__(self, admin_keys: Iterable[str], tenants: ApiKeys) -> None:
        self._admin = [f"Bearer {k}".encode() for k in admin_keys]
        self._tenants = tenants

    def check(self, request: Request) -> None:
        """Passes an admin caller; raises 401 (no or wrong key) or 403 (a tenant key, or a
        remote caller while no admin key is configured)."""
        if not self._admin:
            peer = request.client.host if request.client else None
            if not is_loopback(peer):
                raise PermissionDeniedError(
                    "admin routes answer only to loopback callers while no admin key is "
                    "configured (admin_api_key_file or $ZAYASERVE_ADMIN_API_KEY)")
            return
        given = (request.headers.get("authorization") or "").encode()
        if any([hmac.compare_digest(given, k) for k in self._admin]):  # all compared
            return
        try:
            tenant = self._tenants.tenant(given) if self._tenants.enabled else None
        except AuthenticationError:
            tenant = None
        if tenant is not None:
            raise PermissionDeniedError("this API key is a tenant key: admin routes need the "
                                        "admin key")
        raise AuthenticationError("admin routes need the admin key (Authorization: Bearer ...)")
