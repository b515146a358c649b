"""The one trio runner of the tests: real time, or trio's autojump clock for retry, backoff and
timeout tests (virtual seconds, so a 30 s backoff costs nothing and its length can be asserted).

The autojump clock jumps whenever every task waits, so it must not be used while work runs on
worker threads (chunk writes, hashing): a deadline would fire while a thread still works. Such
tests run on the real clock with a generous hang guard instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
import trio.testing

T = TypeVar("T")


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """`fn(*args)` on the real clock."""
    return trio.run(fn, *args)


def run_virtual(fn: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    """`fn()` on the autojump clock: its result and the virtual seconds it took."""

    async def main() -> tuple[T, float]:
        start = trio.current_time()
        result = await fn()
        return result, trio.current_time() - start

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
