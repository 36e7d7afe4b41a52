"""How many requests an engine queues: at most `max_pending_requests`, counting the slots that
groups of requests admitted together hold (an RSA run reserves a round's worth up front, so none
of its calls meets a full queue halfway through the run)."""

from __future__ import annotations

import threading

# The share of the queue that reservations (RSA runs' rounds) may hold together.
RESERVE_SHARE = 0.5


class EngineOverloadedError(RuntimeError):
    """The bounded request queue is full: the caller should answer 429 / RESOURCE_EXHAUSTED."""


class Reservation:
    """Queue slots held for a group of requests; others see them as taken. Its requests use
    them instead of free ones. Release it (`with`) when the group is done."""

    def __init__(self, admission: Admission, slots: int) -> None:
        self.admission, self.free, self.open = admission, slots, True
        self.size = slots

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        with self.admission.lock:
            if self.open:
                self.open = False
                self.admission.reserved -= self.free
                self.admission.held -= self.size


class Admission:
    """The count behind the queue bound. `reserve` and `admit` are called with `lock` held
    and the number of requests in flight."""

    def __init__(self, max_pending: int, lock: threading.Lock,
                 reserve_share: float = RESERVE_SHARE) -> None:
        self.max_pending, self.lock = max_pending, lock
        self.reserved = 0  # slots held by open reservations and not in use
        self.held = 0  # slots of open reservations, in use or not
        # Reservations together never take more than this many slots: ordinary requests
        # always keep the rest of the queue.
        self.max_held = max(1, int(max_pending * reserve_share))

    def reserve(self, in_flight: int, slots: int) -> Reservation:
        taken = in_flight + self.reserved
        if taken + slots > self.max_pending:
            raise EngineOverloadedError(
                f"{taken} requests in flight or reserved, {slots} more asked for "
                f"(max_pending_requests={self.max_pending})")
        if self.held + slots > self.max_held:
            raise EngineOverloadedError(
                f"{self.held} queue slots reserved by runs, {slots} more asked for; runs may "
                f"hold at most {self.max_held} of max_pending_requests={self.max_pending}")
        self.reserved += slots
        self.held += slots
        return Reservation(self, slots)

    def admit(self, in_flight: int, reservation: Reservation | None) -> bool:
        """Room for one more request, or EngineOverloadedError; True when it took a slot of
        `reservation` (to `give_back` when it ends)."""
        if reservation is not None and reservation.open and reservation.free > 0:
            reservation.free -= 1
            self.reserved -= 1
            return True
        if in_flight + self.reserved >= self.max_pending:
            raise EngineOverloadedError(
                f"{in_flight} requests in flight, {self.reserved} slots reserved "
                f"(max_pending_requests={self.max_pending})")
        return False

    def give_back(self, reservation: Reservation) -> None:
        with self.lock:
            reservation.free += 1
            if reservation.open:
                self.reserved += 1
