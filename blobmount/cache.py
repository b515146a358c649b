"""On-disk stores. Today: the decoded-content store (zstd files decoded once, keyed by file sha256).

Layout: ``CACHE_DIR/content/<hh>/<sha256 hex>``: the decoded bytes followed by a 16-byte trailer
(``xxh3_64`` of the content, then the magic ``b"BMCONT01"``), so a bit flipped on disk is caught
before a byte of the file is served, without rehashing sha256 (xxh3 runs at memory speed).

Concurrency contract:
- Files appear only by ``rename`` of a fully written ``*.tmp`` in the same directory, so no process
  ever opens a half-written file. There is no fsync: after a power cut a renamed file may be torn,
  and its trailer check turns that into a miss, so a disk flush per decoded file would buy nothing;
  ``*.tmp`` older than a day are purged at start (another
  process may be writing younger ones).
- Within one process, :meth:`ContentStore.fill` is single-flight per key: the first caller decodes,
  later callers wait on a ``trio.Event`` and then open the finished file. Across processes two
  daemons may decode the same file at once; the second rename replaces an identical file (harmless).
- Files are opened by :meth:`ContentStore.open`, which pins the key; eviction skips pinned keys and
  an unlinked-but-open file stays readable, so eviction never takes bytes from a reader.
- Work on the file system (write, hash) runs in worker threads; the store's bookkeeping
  (``_sizes``, ``_pins``, ``_inflight``) is touched only from the trio thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
import xxhash

from blobmount.errors import LimitExceeded, SourceError, UsageError

log = logging.getLogger(__name__)

_TRAILER = struct.Struct("<Q8s")
_MAGIC = b"BMCONT01"
TRAILER_BYTES = _TRAILER.size
_TMP_MAX_AGE_S = 24 * 3600  # older *.tmp files belong to dead processes
DEFAULT_CACHE_SIZE_BYTES = 10 << 30  # 10 GiB: room for the decoded working set of large archives


def default_cache_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/blobmount")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blobmount"


def prepare_cache_dir(path: Path) -> Path:
    """Create `path` 0700 if missing; refuse one that others can write (cache poisoning)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise UsageError(f"cache dir {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"cache dir {path}: not a directory")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(f"cache dir {path}: group- or world-writable (mode {st.st_mode & 0o777:o}); refusing")
    return path


@dataclass(slots=True)
class _Flight:
    done: trio.Event
    error: BaseException | None = None


class ContentStore:
    """Decoded file contents keyed by sha256, bounded by `max_bytes` (LRU by mtime, pinned kept)."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_CACHE_SIZE_BYTES) -> None:
        self.root = prepare_cache_dir(root) / "content"
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.max_bytes = max_bytes
        self._sizes: dict[str, int] = {}
        self._pins: dict[str, int] = {}
        self._inflight: dict[str, _Flight] = {}
        self._checked: set[str] = set()
        self._scan()

    def _scan(self) -> None:
        """One cheap pass: sizes of the files present (no hashing), stale temp files removed."""
        now = time.time()
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                if f.name.endswith(".tmp"):
                    if now - st.st_mtime > _TMP_MAX_AGE_S:
                        f.unlink(missing_ok=True)
                    continue
                self._sizes[f.name] = st.st_size

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    async def fill(self, key: str, size: int, produce: Callable[[Path], None]) -> None:
        """Make `key` present. `produce(tmp)` runs on a worker thread, writes the content to `tmp`
        and raises if it is wrong (it must verify). Single-flight per key within this process."""
        while True:
            if key in self._sizes and self._path(key).exists():
                return
            flight = self._inflight.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
        if size + TRAILER_BYTES > self.max_bytes:
            raise LimitExceeded(
                f"decoded file of {size} bytes does not fit the {self.max_bytes}-byte cache (--cache-size)"
            )
        flight = _Flight(trio.Event())
        self._inflight[key] = flight
        try:
            self._make_room(size + TRAILER_BYTES)
            final = self._path(key)
            await trio.to_thread.run_sync(self._write, final, produce)
            self._sizes[key] = size + TRAILER_BYTES
            self._checked.add(key)
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._inflight[key]
            flight.done.set()

    @staticmethod
    def _write(final: Path, produce: Callable[[Path], None]) -> None:
        final.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            produce(tmp)
            h = xxhash.xxh3_64()
            with open(tmp, "r+b") as f:
                while block := f.read(1 << 20):
                    h.update(block)
                f.write(_TRAILER.pack(h.intdigest(), _MAGIC))
            os.rename(tmp, final)
        except OSError as exc:
            raise SourceError(f"content cache {final.parent}: cannot write: {exc.strerror}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _make_room(self, need: int) -> None:
        excess = self.used_bytes + need - self.max_bytes
        if excess <= 0:
            return
        victims = []
        for key in self._sizes:
            if self._pins.get(key) or key in self._inflight:
                continue
            try:
                victims.append((self._path(key).stat().st_mtime, key))
            except FileNotFoundError:
                victims.append((0.0, key))
        victims.sort()
        for _mtime, key in victims:
            if excess <= 0:
                break
            excess -= self._sizes.pop(key)
            self._checked.discard(key)
            self._path(key).unlink(missing_ok=True)

    async def open(self, key: str) -> int | None:
        """An fd of the content for `key` (pinned until :meth:`release`), or None on a miss. A file
        whose trailer does not match its bytes is deleted and reported as a miss."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._sizes.pop(key, None)
            return None
        if key not in self._checked:
            ok = await trio.to_thread.run_sync(_trailer_ok, fd)
            if not ok:
                os.close(fd)
                log.warning("content cache: %s failed its checksum; discarded and refetched", path)
                path.unlink(missing_ok=True)
                self._sizes.pop(key, None)
                return None
            self._checked.add(key)
        self._pins[key] = self._pins.get(key, 0) + 1
        self._sizes.setdefault(key, os.fstat(fd).st_size)
        with contextlib.suppress(OSError):
            os.utime(fd)  # LRU clock
        return fd

    def release(self, key: str, fd: int) -> None:
        os.close(fd)
        left = self._pins.get(key, 0) - 1
        if left > 0:
            self._pins[key] = left
        else:
            self._pins.pop(key, None)


def _trailer_ok(fd: int) -> bool:
    size = os.fstat(fd).st_size
    if size < TRAILER_BYTES:
        return False
    digest, magic = _TRAILER.unpack(os.pread(fd, TRAILER_BYTES, size - TRAILER_BYTES))
    if magic != _MAGIC:
        return False
    h = xxhash.xxh3_64()
    pos, end = 0, size - TRAILER_BYTES
    while pos < end:
        block = os.pread(fd, min(1 << 20, end - pos), pos)
        if not block:
            return False
        h.update(block)
        pos += len(block)
    return bool(h.intdigest() == digest)
