"""The one progress line of the commands that move many bytes (create, push, cp, prefetch).

Drawn on stderr only when enabled (the commands enable it on a terminal, or when asked with
``--progress``), redrawn at most every :data:`INTERVAL_S` and once more at the end, so a fast
command costs a few writes and a slow one stays readable: ``LABEL [#####    ]  40% 12/30 files
120 MiB 95 MB/s``. It may be advanced from worker threads (create's compressors), hence the lock;
it never moves backwards (a restarted upload re-sends bytes already counted).
"""

from __future__ import annotations

import sys
import threading
import time

INTERVAL_S = 0.2  # redraw at most this often
BAR_WIDTH = 25


class ProgressLine:
    def __init__(self, label: str, total_bytes: int, *, enabled: bool, files: int | None = None) -> None:
        self.label = label
        self.total = max(total_bytes, 1)
        self.files = files
        self.enabled = enabled
        self.done = 0
        self.done_files = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._lock = threading.Lock()

    def advance(self, nbytes: int, files: int = 0) -> None:
        """`nbytes` more done (and `files` more files finished)."""
        if self.enabled:
            with self._lock:
                self.done += nbytes
                self.done_files += files
                self._maybe_draw()

    def reach(self, done_bytes: int) -> None:
        """Bytes up to `done_bytes` are done; a smaller figure than before changes nothing."""
        if self.enabled:
            with self._lock:
                self.done = max(self.done, done_bytes)
                self._maybe_draw()

    def close(self) -> None:
        """The last figures, and the line ended, once anything was drawn or done."""
        if self.enabled and (self.done or self.done_files):
            with self._lock:
                self._draw(time.monotonic())
                sys.stderr.write("\n")
                sys.stderr.flush()

    def line(self, now: float) -> str:
        pct = min(100, self.done * 100 // self.total)
        bar = "#" * (pct * BAR_WIDTH // 100)
        files = f"{self.done_files}/{self.files} files " if self.files is not None else ""
        rate = self.done / max(now - self.started, 1e-6) / 1e6
        return f"{self.label} [{bar:<{BAR_WIDTH}}] {pct:3d}% {files}{self.done >> 20} MiB {rate:.0f} MB/s"

    def _finished(self) -> bool:
        return self.done >= self.total if self.files is None else self.done_files >= self.files

    def _maybe_draw(self) -> None:
        now = time.monotonic()
        if now - self._drawn >= INTERVAL_S or self._finished():
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._drawn = now
        sys.stderr.write("\r" + self.line(now))
        sys.stderr.flush()
