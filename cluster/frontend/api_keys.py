"""API keys: who may call the front ends, and the prefix-cache salt each caller gets.

Keys come from the config (`api_key`), a file of one key per line (`api_key_file`, e.g. a
mounted Kubernetes Secret) and the `ZAYASERVE_API_KEY` environment variable (comma-separated),
never from a command line, and they are never logged. Each key is a tenant: its requests get a
prefix-cache salt derived from the key, so one tenant's cached prefixes (and whether a prefix
was cached at all) are invisible to another; a request's own `cache_salt` narrows it further.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from zayaserve.cluster.frontend.frontend_errors import AuthenticationError

ENV_VAR = "ZAYASERVE_API_KEY"


def load_api_keys(api_key: str | None = None, api_key_file: str | None = None,
                  env_var: str = ENV_VAR, field: str = "api_key") -> list[str]:
    """Every configured key (the config's, the file's, the variable's); a missing or empty key
    file is a config error naming the field (`<field>_file`)."""
    keys = [api_key] if api_key else []
    if api_key_file:
        try:
            lines = Path(api_key_file).read_text().splitlines()
        except OSError as err:
            raise ValueError(f"{field}_file: cannot read {api_key_file!r} "
                             f"({err.strerror or type(err).__name__})") from None
        found = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not found:
            raise ValueError(f"{field}_file: {api_key_file!r} holds no key")
        keys += found
    keys += [k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()]
    short = [k for k in keys if len(k) < 8]
    if short:
        raise ValueError(f"{field}: keys must be at least 8 characters")
    return list(dict.fromkeys(keys))


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._expected = [(f"Bearer {k}".encode(), _tenant(k)) for k in keys]

    @classmethod
    def of(cls, api_key: str | None, api_keys: list[str] | None) -> ApiKeys:
        """The front ends' arguments: a list of keys, else one key, else none (open)."""
        return cls(api_keys if api_keys is not None else [api_key] if api_key else [])

    @property
    def enabled(self) -> bool:
        return bool(self._expected)

    def tenant(self, authorization: str | bytes | None) -> str | None:
        """The caller's tenant id for an `Authorization` header value (None when no keys are
        configured); AuthenticationError when keys are configured and none matches."""
        if not self._expected:
            return None
        given = authorization.encode() if isinstance(authorization, str) else (
            bytes(authorization or b""))
        found = None
        for expected, tenant in self._expected:  # every key, constant time: no early exit
            if hmac.compare_digest(given, expected):
                found = tenant
        if found is None:
            raise AuthenticationError("Incorrect API key provided (Authorization: Bearer ...)")
        return found


def cache_salt(tenant: str | None, requested: str | None) -> str | None:
    """The salt a request's prefixes are cached under: none without keys or a requested salt;
    otherwise a digest of both, so no tenant can pick another tenant's salt."""
    if tenant is None and requested is None:
        return None
    return hashlib.sha256(f"{tenant or ''}\0{requested or ''}".encode()).hexdigest()


def _tenant(key: str) -> str:
    return hashlib.sha256(b"zayaserve-tenant\0" + key.encode()).hexdigest()[:16]
