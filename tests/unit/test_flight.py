"""The one single flight (blobmount/flight.py): waiters share a leader's work and its failure,
never its cancellation."""

from __future__ import annotations

import pytest
import trio

from blobmount.flight import Flights
from tests.support.aio import run_virtual


def test_waiters_wait_for_the_leader_then_look_again() -> None:
    flights: Flights[str] = Flights()
    done: list[str] = []

    async def lead() -> None:
        with flights.lead("k"):
            await trio.sleep(1)
            done.append("work")

    async def follow() -> None:
        await flights.wait("k")
        done.append("after")

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(lead)
            await trio.sleep(0.1)
            assert flights.busy("k")
            n.start_soon(follow)
        assert not flights.busy("k")

    run_virtual(main)
    assert done == ["work", "after"]


def test_a_failure_reaches_the_waiters_of_that_flight() -> None:
    flights: Flights[str] = Flights()
    seen: list[BaseException] = []

    async def lead() -> None:
        with pytest.raises(ValueError), flights.lead("k"):
            await trio.sleep(1)
            raise ValueError("disk says no")

    async def follow() -> None:
        try:
            await flights.wait("k")
        except ValueError as exc:
            seen.append(exc)

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(lead)
            await trio.sleep(0.1)
            n.start_soon(follow)

    run_virtual(main)
    assert [str(e) for e in seen] == ["disk says no"]


def test_a_cancelled_leader_hands_nothing_on_and_a_waiter_leads_afresh() -> None:
    flights: Flights[str] = Flights()
    events: list[str] = []

    async def lead() -> None:
        with trio.move_on_after(1), flights.lead("k"):  # its request's deadline
            await trio.sleep(10)
        events.append("leader cancelled")

    async def follow() -> None:
        await flights.wait("k")  # must return normally: no Cancelled from another scope
        with flights.lead("k"):
            events.append("waiter leads")

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(lead)
            await trio.sleep(0.1)
            n.start_soon(follow)

    run_virtual(main)
    assert events == ["leader cancelled", "waiter leads"]


def test_two_leaders_of_one_key_are_a_bug() -> None:
    flights: Flights[int] = Flights()
    flight = flights.start(1)
    with pytest.raises(RuntimeError):
        flights.start(1)
    flights.end(1, flight)
    assert not flights.busy(1)
