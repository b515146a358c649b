"""The one least-recently-used map: a byte budget (the chunk cache's memory tier, decoded small
files) or a count (remembered tokens), by what ``weigh`` counts.

Not thread-safe: each owner uses it from one thread (the trio thread) or under its own lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _one(_: object) -> int:
    return 1


class LRU(Generic[K, V]):
    """Past `limit` (the sum of ``weigh(value)``: ``len`` for a byte budget, 1 each by default)
    the least recently used entries go. The newest entry always stays, even alone over the limit:
    the caller has just paid for it and is about to use it."""

    def __init__(self, limit: int, weigh: Callable[[V], int] = _one) -> None:
        self.limit = limit
        self._weigh = weigh
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.used = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None when absent."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value, its place unchanged."""
        return self._entries.get(key)

    def put(self, key: K, value: V) -> list[tuple[K, V]]:
        """Keep `value` as the most recently used (replacing any under `key`); returns what went."""
        self.pop(key)
        self._entries[key] = value
        self.used += self._weigh(value)
        evicted = []
        while self.used > self.limit and len(self._entries) > 1:
            old_key, old = self._entries.popitem(last=False)
            self.used -= self._weigh(old)
            evicted.append((old_key, old))
        return evicted

    def pop(self, key: K) -> V | None:
        value = self._entries.pop(key, None)
        if value is not None:
            self.used -= self._weigh(value)
        return value
