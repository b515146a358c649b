"""The faults of tests/fuse/test_network_faults.py and of its kernel-free twin
(tests/fs/test_network_twins.py), written once so the two cannot drift: what each copy of the
archive holds, and how each fault is made briefly and persistently."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from tests.support.faults import Fault, Kind

KiB, MiB = 1 << 10, 1 << 20
TARGETS = ("small.bin", "small.txt", "big.txt", "verified.bin", "lazy.bin")
LAZY_READ = (5 * MiB, 256 * KiB)  # (offset, size) read of lazy.bin: not its head


@dataclass(frozen=True)
class Case:
    """How to make one fault, persistently and briefly (None: it has no brief form)."""

    persistent: Callable[[], Fault]
    brief: Callable[[], Fault] | None


CASES: dict[str, Case] = {
    "reset-mid-body": Case(lambda: Fault(Kind.RESET), lambda: Fault(Kind.RESET, times=1)),
    "truncated-body": Case(lambda: Fault(Kind.TRUNCATE), lambda: Fault(Kind.TRUNCATE, times=1)),
    "stall-before-headers": Case(lambda: Fault(Kind.STALL), lambda: Fault(Kind.STALL, stall_s=0.5, times=1)),
    "stall-mid-body": Case(lambda: Fault(Kind.STALL_BODY), lambda: Fault(Kind.STALL_BODY, stall_s=0.5, times=1)),
    "slow-drip-1KiB/s": Case(lambda: Fault(Kind.DRIP, rate_bps=1024), None),
    "500": Case(lambda: Fault(Kind.STATUS, status=500), lambda: Fault(Kind.STATUS, status=500, times=2)),
    "502": Case(lambda: Fault(Kind.STATUS, status=502), lambda: Fault(Kind.STATUS, status=502, times=2)),
    "503": Case(lambda: Fault(Kind.STATUS, status=503), lambda: Fault(Kind.STATUS, status=503, times=2)),
    "429-retry-after": Case(
        lambda: Fault(Kind.STATUS, status=429, retry_after="30"),  # longer than --timeout: EIO in time
        lambda: Fault(Kind.STATUS, status=429, retry_after="1", times=1),
    ),
    "wrong-content-range": Case(lambda: Fault(Kind.CONTENT_RANGE), lambda: Fault(Kind.CONTENT_RANGE, times=1)),
    "body-longer-than-asked": Case(lambda: Fault(Kind.LONGER), lambda: Fault(Kind.LONGER, times=1)),
    "redirect-loop": Case(lambda: Fault(Kind.REDIRECT_LOOP), lambda: Fault(Kind.REDIRECT_LOOP, times=2)),
    "closed-without-answer": Case(lambda: Fault(Kind.CLOSE), lambda: Fault(Kind.CLOSE, times=1)),
    "404-for-the-blob": Case(lambda: Fault(Kind.STATUS, status=404), None),
}


TOKEN_FAULTS: dict[str, tuple[Callable[[], Fault], int, bool]] = {  # fault, errno, brief one survived
    "500": (lambda: Fault(Kind.STATUS, status=500), errno.EIO, True),
    "stall": (lambda: Fault(Kind.STALL), errno.EIO, True),
    "closed": (lambda: Fault(Kind.CLOSE), errno.EIO, True),
    "401": (lambda: Fault(Kind.STATUS, status=401), errno.EACCES, False),  # credentials refused
}
