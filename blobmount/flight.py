"""The one single flight: per key, one task does the work while the others wait for it.

Within one trio loop. A waiter wakes when the flight ends and looks again (the work's result is
wherever the work put it: a cache file, a table). A leader's failure (an ``Exception``) is raised
in the waiters of that flight (:meth:`Flights.wait`), so a refusal is not retried by every waiter
in turn; a waiter that retries on its own terms uses :meth:`Flights.settle` instead. A
cancellation is never handed on: a leader cancelled (its request's deadline, its reader gone)
ends the flight with nothing stored, and the first waiter to wake leads afresh. Handing a
``trio.Cancelled`` to another task would cancel it from outside its own scope.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True, eq=False)
class Flight:
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None


class Flights(Generic[K]):
    def __init__(self) -> None:
        self._flights: dict[K, Flight] = {}

    def busy(self, key: K) -> bool:
        return key in self._flights

    async def wait(self, key: K) -> None:
        """Until the flight of `key` (if any) ends; its leader's Exception, if it failed."""
        flight = self._flights.get(key)
        if flight is None:
            return
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error

    async def settle(self, key: K) -> None:
        """Until the flight of `key` (if any) ends, whatever its outcome: for a waiter that looks
        again afterwards and may lead a flight of its own (a failed check or decode is not handed
        on: the next try goes afresh)."""
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()

    def start(self, key: K) -> Flight:
        """Lead the flight of `key` (none may be running); :meth:`end` it, whatever happens. For
        work that spans calls (a decode that commits or aborts later); else :meth:`lead`."""
        if key in self._flights:
            raise RuntimeError(f"a flight for {key!r} is running already")
        flight = self._flights[key] = Flight()
        return flight

    def end(self, key: K, flight: Flight, error: BaseException | None = None) -> None:
        """End `flight`; an Exception reaches its waiters, anything else (Cancelled) does not."""
        if isinstance(error, Exception):
            flight.error = error
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.done.set()

    @contextlib.contextmanager
    def lead(self, key: K) -> Iterator[None]:
        """Lead the flight of `key` for the body of the ``with``."""
        flight = self.start(key)
        try:
            yield
        except BaseException as exc:
            self.end(key, flight, exc)
            raise
        self.end(key, flight)
