"""Reads through a mount that cannot hang a test: each runs on its own thread and is waited for at
most a hang guard; the outcome says what came back (bytes or errno) and how long the slowest
single system call (open or pread, i.e. one FUSE request plus the kernel's share) took."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

READ_BYTES = 128 << 10  # the kernel's FUSE read size: one pread is about one FUSE request


@dataclass(frozen=True, slots=True)
class Outcome:
    data: bytes | None  # None when a call failed
    errno: int | None
    longest_s: float  # the slowest open/pread of this read

    @property
    def ok(self) -> bool:
        return self.errno is None


class PendingRead:
    """A read running on its own thread; :meth:`result` waits for it, at most `guard_s`."""

    def __init__(self, path: Path, offset: int = 0, size: int | None = None) -> None:
        self.path = path
        self._out: Outcome | None = None
        self._thread = threading.Thread(target=self._run, args=(offset, size), daemon=True)
        self._thread.start()

    def _run(self, offset: int, size: int | None) -> None:
        longest = 0.0
        parts: list[bytes] = []
        t0 = time.monotonic()
        try:
            fd = os.open(self.path, os.O_RDONLY)
            longest = time.monotonic() - t0
            try:
                pos = offset
                end = None if size is None else offset + size
                while end is None or pos < end:
                    n = READ_BYTES if end is None else min(READ_BYTES, end - pos)
                    t0 = time.monotonic()
                    chunk = os.pread(fd, n, pos)
                    longest = max(longest, time.monotonic() - t0)
                    if not chunk:
                        break
                    parts.append(chunk)
                    pos += len(chunk)
            finally:
                os.close(fd)
            self._out = Outcome(b"".join(parts), None, longest)
        except OSError as exc:
            self._out = Outcome(None, exc.errno, max(longest, time.monotonic() - t0))

    def result(self, guard_s: float) -> Outcome:
        self._thread.join(guard_s)
        if self._thread.is_alive() or self._out is None:
            pytest.fail(f"read of {self.path} still waiting after the {guard_s:g} s hang guard")
        return self._out


def read_bounded(path: Path, guard_s: float, offset: int = 0, size: int | None = None) -> Outcome:
    return PendingRead(path, offset, size).result(guard_s)
