"""The one retry policy: which errors are worth another attempt, how long to wait before it, how many
attempts there are, and how a retry is logged and counted.

Every retry loop (the client's requests, a blob upload's restarts, the fetcher's resumed range
reads) asks :class:`Retry` and nothing else, and each failure is retried by exactly one loop: a
loop that calls another retrying operation passes ``retry=False`` down, so a lasting 503 costs
``MAX_ATTEMPTS`` requests (the count the README states), never a product of nested counts.

Backoff: ``BACKOFF_FIRST_S`` doubling to ``BACKOFF_MAX_S``, jittered 0.5-1.5x so a fleet does not
retry in lockstep, and never shorter than a ``Retry-After`` the server sent. All of it runs inside
the caller's total ``--timeout``. Kept free of httpx: the fetcher uses it without knowing HTTP.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import trio

from blobmount.daemon import logs, metrics
from blobmount.errors import BlobmountError, TransientError

retry_log = logging.getLogger(logs.RETRY_LOGGER)  # one-shot commands quiet it (logs.py)

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
MAX_ATTEMPTS = 6  # with backoff capped at 5 s this stays inside a 30 s budget
RETRY_AFTER_MAX_S = BACKOFF_MAX_S * 4  # a Retry-After longer than this is not waited for in full
LOUD_AFTER = 3  # the third retry in a row (by attempt or by streak) is a WARNING, not DEBUG


class RetryLater(TransientError):
    """An answer that asks to be retried (429, 500, 502, 503, 504), with its ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: float | None, status: int = 0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status


def is_transient(exc: BaseException) -> bool:
    """Whether retrying `exc` may succeed (the one predicate every retry loop uses)."""
    return isinstance(exc, TransientError)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (capped); None for an absent or HTTP-date value (our
    own backoff then applies)."""
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), RETRY_AFTER_MAX_S))
    except ValueError:
        return None


def backoff_s(attempt: int, exc: BaseException) -> float:
    """The pause after failed attempt number `attempt` (1-based)."""
    delay: float = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (attempt - 1))
    delay *= 0.5 + random.random()
    if isinstance(exc, RetryLater) and exc.retry_after_s is not None:
        delay = max(delay, exc.retry_after_s)
    return delay


@dataclass(slots=True)
class Retry:
    """The policy as one object per client (or fetcher): the attempt budget, and the streak of
    retries since the last good answer, which escalates the log level when retries keep coming
    across operations (each loop restarts its own attempt count, not the streak)."""

    attempts: int = MAX_ATTEMPTS
    streak: int = 0
    last_error: BlobmountError | None = None  # what the last retry was for (timeout messages)

    def answered(self) -> None:
        """A good answer arrived: retries from now on start a new streak."""
        self.streak = 0

    def should_retry(self, attempt: int, exc: BaseException) -> bool:
        return is_transient(exc) and attempt < self.attempts

    async def pause(self, attempt: int, exc: BlobmountError, what: str = "") -> None:
        """Log and count retry number `attempt`, then sleep its backoff."""
        delay = backoff_s(attempt, exc)
        self.streak += 1
        self.last_error = exc
        level = logging.DEBUG if attempt < LOUD_AFTER and self.streak < LOUD_AFTER else logging.WARNING
        metrics.HTTP_RETRIES.inc()
        retry_log.log(level, "%s%s; retry %d in %.2f s", what, exc, attempt, delay)
        await trio.sleep(delay)
