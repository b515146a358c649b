"""The one wrapper every FUSE handler goes through (fs.py): errors to errnos, the deadline, metrics.

Every handler runs inside :func:`fuse_errors`: a :class:`BlobmountError` becomes its errno from the
one table in errors.py; anything else is logged with its traceback and becomes EIO. Only FUSEError
leaves a handler, so one bad request never takes the mount down. trio.Cancelled is never caught.
Under a kernel FUSE request timeout the wrapper also answers EIO once a handler has had its share
of it (``deadline_s``), so no request outlives the timeout and the kernel never aborts the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import pyfuse3
import trio

from blobmount.daemon import metrics
from blobmount.errors import BlobmountError, IntegrityError, TransientError, Unservable, errno_for

log = logging.getLogger("blobmount.fs")  # the logger these lines always had

P = ParamSpec("P")
R = TypeVar("R")


class Bounded(Protocol):
    """The filesystem as the wrapper sees it: the bound on a waiting handler."""

    deadline_s: float  # every waiting handler answers within this (inf: no bound)


H = TypeVar("H", bound=Bounded)


# The handlers that wait (for the network, for disk threads); the others answer from memory without
# a checkpoint, so a deadline could never fire in them, and its cancel scope (18-29 us measured with
# trio 0.35, as much as a getattr itself) is spent only where it can.
_WAITING_OPS = frozenset({"open", "read"})


async def _within(seconds: float, op: str, handler: Coroutine[Any, Any, R]) -> R:
    with trio.move_on_after(seconds):
        return await handler
    raise TransientError(
        f"{op}: not served within {seconds:g} s, the bound under the kernel's FUSE request timeout;"
        " answered EIO (the next request tries afresh)"
    )


def fuse_errors(
    func: Callable[Concatenate[H, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[H, P], Coroutine[Any, Any, R]]:
    """Translate every exception of a handler at the FUSE boundary (the only place that does), and
    answer a waiting one (_WAITING_OPS) within the filesystem's ``deadline_s`` of taking the
    request: past it the handler is cancelled and the reader gets EIO. What it waited for (a fetch)
    goes on in the mount's nursery or is dropped cleanly, so the next request tries afresh."""

    op = func.__name__
    requests, latency = metrics.FUSE_REQUESTS.labels(op=op), metrics.FUSE_LATENCY.labels(op=op)

    waits = op in _WAITING_OPS

    @functools.wraps(func)
    async def wrapper(fs: H, /, *args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        code = 0
        try:
            if waits and fs.deadline_s < math.inf:
                result = await _within(fs.deadline_s, op, func(fs, *args, **kwargs))
            else:
                result = await func(fs, *args, **kwargs)
            if op == "read":
                metrics.FUSE_READ_BYTES.inc(len(result))  # type: ignore[arg-type]
            return result
        except pyfuse3.FUSEError as exc:
            code = exc.errno
            raise
        except (IntegrityError, Unservable) as exc:  # the reader logged it once, when it found it
            code = errno_for(exc)
            log.debug("%s: %s", func.__name__, exc)
            raise pyfuse3.FUSEError(code) from None
        except BlobmountError as exc:
            code = errno_for(exc)
            if code == errno.EIO:
                log.error("%s", exc)
            else:
                log.debug("%s: %s", func.__name__, exc)
            raise pyfuse3.FUSEError(code) from None
        except Exception as exc:
            code = errno_for(exc)  # EIO: not one of ours
            log.exception("unexpected error in %s; answered EIO", func.__name__)
            raise pyfuse3.FUSEError(code) from None
        finally:  # metrics: counted here, in the one wrapper every handler goes through
            requests.inc()
            latency.observe(time.perf_counter() - started)
            if code:
                metrics.FUSE_ERRORS.labels(op=op, errno=errno.errorcode.get(code, str(code))).inc()

    return wrapper
