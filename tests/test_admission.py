"""The engine's queue bound with reservations (a group of requests admitted together)."""

from __future__ import annotations

import threading

import pytest

from zayaserve.replicas.engine.admission import Admission, EngineOverloadedError


def test_reserved_slots_are_taken_for_others_and_free_for_the_group() -> None:
    a = Admission(max_pending=4, lock=threading.Lock(), reserve_share=1.0)
    assert a.admit(0, None) is False  # one ordinary request in flight
    group = a.reserve(in_flight=1, slots=3)
    with pytest.raises(EngineOverloadedError, match="3 slots reserved"):
        a.admit(1, None)  # 1 in flight + 3 reserved: full for anyone else
    assert [a.admit(1 + i, group) for i in range(3)] == [True, True, True]
    with pytest.raises(EngineOverloadedError):
        a.admit(4, group)  # the group used its slots and the queue is full
    a.give_back(group)  # one of the group's requests ended: its slot stays the group's
    with pytest.raises(EngineOverloadedError):
        a.admit(3, None)
    assert a.admit(3, group) is True


def test_a_reservation_that_does_not_fit_fails_whole_and_release_frees_the_rest() -> None:
    a = Admission(max_pending=4, lock=threading.Lock(), reserve_share=1.0)
    with pytest.raises(EngineOverloadedError, match="3 more asked for"):
        a.reserve(in_flight=2, slots=3)
    assert a.reserved == 0  # nothing held by the refused reservation
    with a.reserve(in_flight=0, slots=3) as group:
        assert a.admit(0, group) is True
        assert a.reserved == 2
    assert a.reserved == 0 and not group.open
    a.give_back(group)  # a request outliving its group returns nothing to the pool
    assert a.reserved == 0
    assert a.admit(0, group) is False  # a closed reservation is an ordinary request


def test_reservations_together_never_take_more_than_their_share() -> None:
    """RSA runs reserve rounds' worth of the queue; ordinary requests always keep the rest."""
    a = Admission(max_pending=8, lock=threading.Lock(), reserve_share=0.5)
    first = a.reserve(in_flight=0, slots=3)
    with pytest.raises(EngineOverloadedError, match="runs may hold at most 4"):
        a.reserve(in_flight=0, slots=2)
    assert a.admit(0, first) is True  # using a reserved slot keeps it held
    with pytest.raises(EngineOverloadedError, match="runs may hold at most 4"):
        a.reserve(in_flight=1, slots=2)
    for i in range(4):  # the unreserved half stays open to everyone
        assert a.admit(1 + i, None) is False
    first.__exit__()
    assert a.held == 0
    with a.reserve(in_flight=5, slots=3):
        pass
