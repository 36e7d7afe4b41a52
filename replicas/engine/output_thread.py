"""The output processor on a thread of its own, off the engine's step loop.

The engine thread hands over each step's `TokenRecord`s and goes on to the next step; this
thread detokenizes, cuts stop strings and makes the `StepDelta`s, which either wait for the
engine's next `step()` (offline) or go straight to a `sink` (the async engine's delivery). At
most `max_lag` steps wait here: an engine that outruns its output blocks, so the tokens it
computes for a sequence whose stop string it has not heard of yet stay bounded. A failure to
process a step's records is kept, with the requests it concerns, for the engine to raise.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from zayaserve.replicas.engine.output_processor import OutputProcessor, TokenRecord
from zayaserve.replicas.engine.outputs import StepDelta

log = logging.getLogger("zayaserve.engine")


@dataclass(frozen=True, slots=True)
class OutputFailure:
    error: BaseException
    request_ids: set[str]


class OutputThread:
    def __init__(self, processor: OutputProcessor, max_lag: int = 2) -> None:
        self.processor = processor
        # Where deltas go as they are made (called on this thread); None: kept for `take`.
        self.sink: Callable[[list[StepDelta]], None] | None = None
        self._inbox: queue.Queue[list[TokenRecord]] = queue.Queue(maxsize=max_lag)
        self._lock = threading.Lock()
        self._ready: list[StepDelta] = []
        self._failures: list[OutputFailure] = []
        # The thread holds only a weak reference: when the engine is dropped, the thread ends.
        threading.Thread(target=_serve, args=(weakref.ref(self), self._inbox),
                         name="zayaserve-output", daemon=True).start()

    def submit(self, records: list[TokenRecord]) -> None:
        """Queues one step's records (blocks while `max_lag` steps wait)."""
        self._inbox.put(records)

    def _process(self, records: list[TokenRecord]) -> None:
        if any(map(self.processor.failed, records)):
            records = [r for r in records if not self.processor.failed(r)]
        try:
            deltas = self.processor.process(records)
            if self.sink is not None:
                self.sink(deltas)
                return
        except Exception as err:  # this step's requests fail; the thread goes on
            log.exception("output processing failed")
            with self._lock:
                self._failures.append(OutputFailure(err, self.processor.fail(records)))
            return
        with self._lock:
            self._ready.extend(deltas)

    def take(self) -> tuple[list[StepDelta], OutputFailure | None]:
        """The deltas made since the last call, and the oldest failure not yet taken."""
        with self._lock:
            ready, self._ready = self._ready, []
            failure = self._failures.pop(0) if self._failures else None
        return ready, failure

    def discard(self, request_id: str) -> None:
        """Drops the deltas of an aborted request that nobody has taken."""
        with self._lock:
            self._ready = [d for d in self._ready if d.request_id != request_id]

    def join(self) -> None:
        """Waits until every submitted step is processed."""
        self._inbox.join()

    @property
    def pending(self) -> bool:
        """Steps submitted and not processed, or deltas or failures not taken."""
        return bool(self._inbox.unfinished_tasks or self._ready or self._failures)


def _serve(ref: weakref.ref[OutputThread], inbox: queue.Queue[list[TokenRecord]]) -> None:
    while True:
        try:
            records = inbox.get(timeout=1.0)
        except queue.Empty:
            if ref() is None:
                return
            continue
        owner = ref()
        try:
            if owner is None:
                return
            owner._process(records)
        finally:
            del owner
            inbox.task_done()
