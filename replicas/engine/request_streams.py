"""The async engine's mailboxes: one per request, fed from the engine's threads, read by asyncio.

A mailbox holds at most one pending `StepDelta`: a newer one is merged into an unread one, so a
consumer that stops reading costs O(its output). After `max_unread_steps` merged steps in a row
the reader is taken as gone: the request ends with `StreamStalledError` and is aborted. An
error, once posted, is final. Mailboxes are keyed by ids the engine makes; the caller's id is a
label the deltas carry back out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zayaserve.replicas.engine.engine_errors import StreamStalledError
from zayaserve.replicas.engine.outputs import StepDelta

Item = StepDelta | BaseException


@dataclass(slots=True)
class Mailbox:
    """One request's latest unread output (or the error that ended it)."""

    loop: asyncio.AbstractEventLoop
    label: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    latest: Item | None = None
    unread: int = 0  # deltas merged before the consumer read them, in a row


class RequestStreams:
    """The open mailboxes. Every method may be called from any thread; `abort` is told of the
    requests whose reader stalled or whose event loop closed."""

    def __init__(self, lock: threading.Lock, max_unread_steps: int,
                 abort: Callable[[str], None]) -> None:
        self.lock = lock
        self.max_unread_steps = max_unread_steps
        self._abort = abort
        self._boxes: dict[str, Mailbox] = {}

    def __len__(self) -> int:
        """Open mailboxes; call with `lock` held."""
        return len(self._boxes)

    def open(self, rid: str, label: str) -> Mailbox:
        """A mailbox for `rid`; call with `lock` held (admission counts it in the same hold)."""
        box = Mailbox(asyncio.get_running_loop(), label)
        self._boxes[rid] = box
        return box

    def close(self, rid: str) -> None:
        with self.lock:
            self._boxes.pop(rid, None)

    def ids(self) -> list[str]:
        with self.lock:
            return list(self._boxes)

    def labels(self, ids: set[str]) -> list[str]:
        with self.lock:
            return [f"{b.label}({rid})" if (b := self._boxes.get(rid)) else rid for rid in ids]

    def deliver(self, items: list[tuple[str, Item, bool]]) -> None:
        """Posts each (request id, item, finished) to its mailbox: one wake-up per consumer
        event loop per call, not one per request (a step of 256 streams is one call into the
        front end's loop)."""
        posts: dict[asyncio.AbstractEventLoop, list[tuple[Mailbox, Item]]] = {}
        owners: dict[int, str] = {}  # id(box) -> request id, to forget a dead loop's boxes
        gone: list[str] = []
        with self.lock:
            for rid, item, finished in items:
                box = self._boxes.get(rid)
                if box is None:
                    continue
                if isinstance(item, StepDelta):
                    item, stalled = self._relabel(box, item, finished)
                    if stalled:
                        gone.append(rid)
                        finished = True
                if finished:
                    self._boxes.pop(rid, None)
                else:
                    owners[id(box)] = rid
                posts.setdefault(box.loop, []).append((box, item))
        for loop, batch in posts.items():
            try:
                loop.call_soon_threadsafe(_post_all, batch)
            except RuntimeError:  # the consumer's event loop is closed: nobody will ever read
                with self.lock:
                    for box, _ in batch:
                        owner = owners.get(id(box))
                        if owner is not None and self._boxes.pop(owner, None) is not None:
                            gone.append(owner)
        for rid in gone:
            self._abort(rid)

    def _relabel(self, box: Mailbox, delta: StepDelta, finished: bool) -> tuple[Item, bool]:
        """The delta under the caller's label, or the stall error if the reader is gone."""
        delta = delta.relabeled(box.label)
        if isinstance(box.latest, StepDelta):
            box.unread += 1
            if box.unread > self.max_unread_steps and not finished:
                return StreamStalledError(
                    f"the client read none of the last {box.unread} steps "
                    f"(max_unread_steps={self.max_unread_steps}); request aborted"), True
        return delta, False


def _post_all(batch: list[tuple[Mailbox, Any]]) -> None:
    for box, item in batch:
        if isinstance(box.latest, StepDelta) and isinstance(item, StepDelta):
            box.latest = box.latest.merged(item)
        elif not isinstance(box.latest, BaseException):
            box.latest = item
        box.wake.set()
