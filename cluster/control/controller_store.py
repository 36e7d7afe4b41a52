"""Where the placement controller keeps the state that must outlive its replica: the epoch and
map version, the slots and their experts, the desired counts, the scale cooldown and the resize
operations (`ControllerState.snapshot`). A restart of the replica (Serve replaces it when it
dies) reads it back in `__init__`.

The store is a small interface (`load` / `save` of one JSON document with a schema version):
`GcsControllerStore` keeps it in Ray's GCS key-value store (every Serve replica is a Ray worker;
with GCS fault tolerance the document survives a head restart too), `MemoryControllerStore` in a
string, for tests.

`ControllerRecord` adds what makes versions monotonic across restarts: each start claims the
next *generation* (stored generation + 1, written at once); a replica that finds a later
generation stored is superseded and stops writing (Serve may run an old and a new replica side
by side during an update). A save writes only when the document changed.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

log = logging.getLogger("zayaserve.controller_store")
SCHEMA_VERSION = 1
NAMESPACE = "zayaserve"


class ControllerStore(Protocol):
    def load(self) -> dict[str, Any] | None:
        """The stored snapshot (None: nothing stored, or a schema this code cannot read)."""

    def save(self, snapshot: dict[str, Any]) -> None:
        """Replace the stored snapshot; raises when the store cannot be written."""


def encode(snapshot: dict[str, Any]) -> bytes:
    return json.dumps({**snapshot, "schema": SCHEMA_VERSION}, sort_keys=True,
                      separators=(",", ":")).encode()


def decode(raw: bytes | str | None) -> dict[str, Any] | None:
    """The snapshot in `raw`; None when empty, unreadable or of another schema version (a
    controller then starts afresh rather than misreading it)."""
    if not raw:
        return None
    try:
        snapshot = json.loads(raw)
    except ValueError:
        log.warning("placement controller store: unreadable snapshot ignored")
        return None
    if not isinstance(snapshot, dict) or snapshot.get("schema") != SCHEMA_VERSION:
        log.warning("placement controller store: snapshot of schema %r ignored (this code "
                    "reads %d)", snapshot.get("schema") if isinstance(snapshot, dict) else None,
                    SCHEMA_VERSION)
        return None
    return snapshot


class MemoryControllerStore:
    """The document in memory, encoded as the GCS one is (tests; one process)."""

    def __init__(self) -> None:
        self.raw: bytes | None = None
        self.saves = 0

    def load(self) -> dict[str, Any] | None:
        return decode(self.raw)

    def save(self, snapshot: dict[str, Any]) -> None:
        self.raw = encode(snapshot)
        self.saves += 1


class GcsControllerStore:
    """The document under `key` in Ray's GCS key-value store (`ray.experimental.internal_kv`)."""

    def __init__(self, key: str, namespace: str = NAMESPACE) -> None:
        self.key, self.namespace = key, namespace

    def load(self) -> dict[str, Any] | None:
        from ray.experimental.internal_kv import _internal_kv_get

        return decode(_internal_kv_get(self.key, namespace=self.namespace))

    def save(self, snapshot: dict[str, Any]) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self.key, encode(snapshot), overwrite=True, namespace=self.namespace)


def store_key(app_name: str) -> str:
    return f"placement-controller/{app_name}"


class ControllerRecord:
    """One controller replica's use of the store: its generation, and writes of its state.

    `deployment` names the deployment the state belongs to (Serve's code version of the
    controller: a new `serve.run` or config gets a new one, a replica Serve restarts keeps it);
    a snapshot of another deployment of the same app is not resumed, only its counters carry.
    """

    def __init__(self, store: ControllerStore, deployment: str | None = None) -> None:
        self.store, self.deployment = store, deployment
        self.generation = 0
        self.superseded = False
        self._last: str | None = None  # the state last written, to skip unchanged ones

    def start(self) -> tuple[dict[str, Any] | None, bool]:
        """Claims the next generation (written at once). Returns the stored state, if any,
        and whether it is this deployment's (to resume) or another's (counters only)."""
        stored = self.store.load() or {}
        self.generation = int(stored.get("generation", 0)) + 1
        # The claim keeps the stored state (and whose it is) until this replica's first save.
        self.store.save({**stored, "generation": self.generation, "saved_at": time.time()})
        state = stored.get("state")
        if not isinstance(state, dict):
            return None, False
        return state, stored.get("deployment") == self.deployment

    def save(self, state: dict[str, Any]) -> bool:
        """Writes `state` when it changed. True: the store holds it (now or already); False:
        superseded by a later generation (nothing written). Raises when the store fails."""
        text = json.dumps(state, sort_keys=True)
        if text == self._last:
            return True
        if self.superseded:
            return False
        stored = self.store.load()
        if stored is not None and int(stored.get("generation", 0)) > self.generation:
            self.superseded = True
            log.error("placement controller generation %d superseded by %s: no longer saving",
                      self.generation, stored.get("generation"))
            return False
        self.store.save({"generation": self.generation, "deployment": self.deployment,
                         "saved_at": time.time(), "state": state})
        self._last = text
        return True
