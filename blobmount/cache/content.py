"""The decoded-content store: zstd files decoded once, keyed by the file's sha256.

Layout: ``CACHE_DIR/content/<hh>/<sha256 hex>``: the decoded bytes followed by a 16-byte trailer
(``xxh3_64`` of the content, then the magic ``b"BMCONT01"``), so a bit flipped on disk is caught
before a byte of the file is served, without rehashing sha256 (xxh3 runs at memory speed). Keyed
by content, so identical files in different archives (any source) are fetched and decoded once.

Concurrency contract:
- Files appear only by ``rename`` of a fully written ``*.tmp`` in the same directory, so no process
  ever opens a half-written file. There is no fsync: after a power cut a renamed file may be torn,
  and its trailer check turns that into a miss.
- :meth:`ContentStore.begin` hands out a reserved temp file that a decode writes while its readers
  read it (decode.py); only :meth:`ContentStore.commit`, once the content is verified, renames it.
- Within one process, :meth:`ContentStore.fill` is single-flight per key: the first caller decodes,
  later callers wait for it (flight.py) and then open the finished file. Across processes two
  daemons may decode the same file at once; the second rename replaces an identical file.
- Space comes from the directory's shared budget (space.py) before the file is written. A file
  open here is pinned (never evicted by this process), and an unlinked-but-open file stays readable
  anyway, so eviction never takes bytes from a reader.
- Work on the file system (write, hash, budget) runs in worker threads; the store's bookkeeping
  (``_pins``, ``_flights``, ``_checked``) is touched only from the trio thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
import xxhash

from blobmount.cache.space import DEFAULT_CACHE_SIZE_BYTES, CacheDir, is_disk_trouble, temp_path
from blobmount.errors import LimitExceeded, SourceError
from blobmount.flight import Flight, Flights

log = logging.getLogger(__name__)

_TRAILER = struct.Struct("<Q8s")
_MAGIC = b"BMCONT01"
TRAILER_BYTES = _TRAILER.size


class StoreUnavailable(SourceError):
    """The store cannot take this file now (budget full of pinned files, disk full or gone)."""


@dataclass(slots=True)
class Pending:
    """A content file being written while it is read (:meth:`ContentStore.begin`)."""

    key: str
    final: Path
    tmp: Path
    fd: int
    size: int
    flight: Flight


class ContentStore:
    """Decoded file contents keyed by sha256 (module docstring)."""

    def __init__(self, cache: CacheDir | Path, max_bytes: int = DEFAULT_CACHE_SIZE_BYTES) -> None:
        """`cache` is the shared directory (or a path, opened with `max_bytes` as its limit)."""
        self.cache = cache if isinstance(cache, CacheDir) else CacheDir(cache, max_bytes)
        self.root = self.cache.subdir("content")
        self._flights: Flights[str] = Flights()
        self._checked: set[str] = set()

    @property
    def max_bytes(self) -> int:
        return self.cache.limit_bytes

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    async def fill(self, key: str, size: int, produce: Callable[[Path], None]) -> None:
        """Make `key` present. `produce(tmp)` runs on a worker thread and writes the `size` bytes of
        content into the existing file `tmp` from offset 0 (open it ``r+b``: it is pre-sized so
        the budget sees it), raising if the content is wrong (it must verify). Single-flight per
        key within this process.

        Raises LimitExceeded when the file can never fit the cache, StoreUnavailable when the disk
        or the budget refuses it now (the caller may decode into memory instead)."""
        while True:
            if self._path(key).exists():
                return
            if not self._flights.busy(key):
                break
            await self._flights.wait(key)
        if size + TRAILER_BYTES > self.max_bytes:
            raise LimitExceeded(
                f"decoded file of {size} bytes does not fit the {self.max_bytes}-byte cache (--cache-size)"
            )
        final = self._path(key)
        with self._flights.lead(key):
            self.cache.pin(final)
            try:
                await trio.to_thread.run_sync(self._write, final, size + TRAILER_BYTES, produce)
                self._checked.add(key)
            finally:
                self.cache.unpin(final)

    def _write(self, final: Path, size: int, produce: Callable[[Path], None]) -> None:
        """Worker thread: temp file at its final size, reserve, produce, trailer, commit."""
        tmp = temp_path(final)
        reserved = written = False
        try:
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(tmp, "xb") as f:
                f.truncate(size)  # visible to the budget's scans before it is reserved (space.py)
            reserved = self.cache.reserve(size)
            if not reserved:
                raise StoreUnavailable(f"content cache {self.cache.root}: --cache-size leaves no room for {size} bytes")
            produce(tmp)
            content = size - TRAILER_BYTES
            h = xxhash.xxh3_64()
            with open(tmp, "r+b") as f:
                left = content
                while left > 0:
                    block = f.read(min(1 << 20, left))
                    if not block:
                        raise SourceError(f"content cache {final.parent}: decoded file came out short")
                    h.update(block)
                    left -= len(block)
                f.write(_TRAILER.pack(h.intdigest(), _MAGIC))
            self.cache.commit(tmp, final)
            written = True
        except OSError as exc:
            if is_disk_trouble(exc):
                raise StoreUnavailable(f"content cache {final.parent}: cannot write: {exc.strerror}") from exc
            raise SourceError(f"content cache {final.parent}: cannot write: {exc.strerror}") from exc
        finally:
            if not written:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                if reserved:
                    self.cache.release(size)

    async def begin(self, key: str, size: int) -> Pending:
        """A pre-sized temp file for `key`, reserved in the budget, for a decode that serves its
        readers while it writes (decode.py); the caller writes it through ``fd``, then
        :meth:`commit` (once verified) or :meth:`abort`. Raises like :meth:`fill`, and
        StoreUnavailable while this process fills the same key."""
        if size + TRAILER_BYTES > self.max_bytes:
            raise LimitExceeded(
                f"decoded file of {size} bytes does not fit the {self.max_bytes}-byte cache (--cache-size)"
            )
        if self._flights.busy(key):
            raise StoreUnavailable(f"content cache: {key} is being decoded already")
        final = self._path(key)
        flight = self._flights.start(key)
        self.cache.pin(final)
        try:
            tmp, fd = await trio.to_thread.run_sync(self._begin, final, size + TRAILER_BYTES)
        except BaseException:
            self._end_flight(key, flight, final)
            raise
        return Pending(key, final, tmp, fd, size, flight)

    def _begin(self, final: Path, size: int) -> tuple[Path, int]:
        """Worker thread: the temp file at its final size, reserved."""
        tmp = temp_path(final)
        try:
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreUnavailable(f"content cache {final.parent}: cannot write: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, size)
            if not self.cache.reserve(size):
                raise StoreUnavailable(f"content cache {self.cache.root}: --cache-size leaves no room for {size} bytes")
        except BaseException as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError):
                raise StoreUnavailable(f"content cache {final.parent}: cannot write: {exc.strerror}") from exc
            raise
        return tmp, fd

    @staticmethod
    def preallocate(pending: Pending) -> None:
        """Worker thread: allocate the blocks of `pending`'s file (:func:`_preallocate`), best effort:
        a disk too full for it fails the writes that follow instead. Called by the decode once its
        first bytes are out (allocating 2 GiB took up to 7 ms: not before the first byte)."""
        with contextlib.suppress(OSError):
            _preallocate(pending.fd, pending.size + TRAILER_BYTES)

    async def commit(self, pending: Pending, xxh3: int) -> None:
        """The verified content of `pending` (its xxh3 computed as it was written) becomes the
        key's file. The fd stays the caller's (readers of the decode go on reading it)."""
        try:
            await trio.to_thread.run_sync(self._commit, pending, xxh3)
            self._checked.add(pending.key)
        finally:
            self._end_flight(pending.key, pending.flight, pending.final)

    def _commit(self, pending: Pending, xxh3: int) -> None:
        try:
            os.pwrite(pending.fd, _TRAILER.pack(xxh3, _MAGIC), pending.size)
            self.cache.commit(pending.tmp, pending.final)
        except OSError as exc:
            self._abort(pending)
            raise SourceError(f"content cache {pending.final.parent}: cannot write: {exc.strerror}") from exc

    async def abort(self, pending: Pending) -> None:
        """Give up `pending`: its temp file goes (open fds keep reading it), its space is freed."""
        try:
            await trio.to_thread.run_sync(self._abort, pending)
        finally:
            self._end_flight(pending.key, pending.flight, pending.final)

    def _abort(self, pending: Pending) -> None:
        with contextlib.suppress(OSError):
            pending.tmp.unlink()
        self.cache.release(pending.size + TRAILER_BYTES)

    def _end_flight(self, key: str, flight: Flight, final: Path) -> None:
        self.cache.unpin(final)
        self._flights.end(key, flight)

    async def open(self, key: str) -> int | None:
        """An fd of the content for `key` (pinned until :meth:`release`), or None on a miss. A file
        whose trailer does not match its bytes is deleted and reported as a miss."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if key not in self._checked:
            ok = await trio.to_thread.run_sync(_trailer_ok, fd)
            if not ok:
                os.close(fd)
                log.warning("content cache: %s failed its checksum; discarded and refetched", path)
                with contextlib.suppress(OSError):
                    size = path.stat().st_size
                    path.unlink()
                    await trio.to_thread.run_sync(self.cache.release, size)
                return None
            self._checked.add(key)
        self.cache.pin(path)
        with contextlib.suppress(OSError):
            os.utime(fd)  # LRU clock
        return fd

    def release(self, key: str, fd: int) -> None:
        os.close(fd)
        self.cache.unpin(self._path(key))


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


def _preallocate(fd: int, size: int) -> None:
    """Allocate the blocks of a file a decode is about to write whole (fallocate(2), mode 0: no
    zeroing, no write). Measured: writing the decoded bytes into allocated blocks cost less system
    time than into a sparse file (ext4's delayed allocation per page). Best effort: a file system
    without fallocate keeps the sparse file (never glibc's posix_fallocate, which emulates it by
    writing zeros over the whole file). Raises OSError when the call fails."""
    if _fallocate is not None and _fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


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
