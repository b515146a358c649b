"""Running a command's trio work from the CLI: Ctrl-C ends it with exit 130, and an exception group
from a nursery is unwrapped to the one error the user should read."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from blobmount.errors import BlobmountError

if TYPE_CHECKING:
    pass

log = logging.getLogger("blobmount")


_T = TypeVar("_T")


def run_interruptible(fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """``trio.run(fn, *args)`` for the commands that talk to a registry for long (push, cat,
    prefetch), with Ctrl-C turned into an orderly cancellation and KeyboardInterrupt (exit 130)
    once everything has unwound. trio's default raises KeyboardInterrupt wherever the code happens
    to be; inside an HTTP library's critical section that can leave a lock held that a later
    shielded clean-up then waits for: a push interrupted during a stalled upload once hung so."""
    import signal

    import trio

    async def main() -> _T:
        interrupted = False
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            try:
                async with trio.open_nursery() as nursery:

                    async def watch() -> None:
                        nonlocal interrupted
                        async for _ in signals:
                            interrupted = True
                            nursery.cancel_scope.cancel()
                            return

                    nursery.start_soon(watch)
                    result = await fn(*args)
                    nursery.cancel_scope.cancel()
            except BaseException as exc:
                if interrupted:
                    raise KeyboardInterrupt from None
                raise unwrapped(exc) from None  # fn's own error (watch never raises)
        if interrupted:
            raise KeyboardInterrupt
        return result

    return trio.run(main)


def unwrapped(exc: BaseException) -> BaseException:
    """The error inside the groups trio's nurseries wrap it in: a command's own nursery, then the
    chunk fetcher's (`cat` of a registry file that failed verification once printed the two groups'
    53-line traceback and exited 1, where IntegrityError means exit 5). A group of several errors
    that are all ours stands for its first; anything else stays as it is (a bug shows in full)."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = _leaves(exc)
        if len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        elif leaves and all(isinstance(e, BlobmountError) for e in leaves):
            return leaves[0]
        else:
            return exc
    return exc


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out
