"""One cache directory, shared by every process that names it: its byte budget and its locks.

Layout of ``CACHE_DIR`` (created 0700; refused when group- or world-writable)::

    lock                 never written: a byte-range lock file (Linux OFD locks)
    usage                8 bytes, little-endian: bytes accounted to the stores below
    chunks/<blob>-<cs>/  data-blob chunks (chunks.py)
    content/<hh>/        decoded file contents (content.py)
    meta/                manifests, index blobs, tag resolutions, verified records (meta.py)

Budget. ``--cache-size`` is a hard limit for the whole directory however many processes share it.
Every store asks :meth:`CacheDir.reserve` before it writes a file and :meth:`CacheDir.release` after
it deletes one; both update ``usage`` under a lock that every process takes (byte 0 of ``lock``). A
write is visible to every scan from the moment it is reserved: the store first creates its ``*.tmp``
at the final size (sparse), then reserves, fills it, and renames it into place with
:meth:`CacheDir.commit` under the same lock, so a scan never misses a reservation in flight. When a
reservation would pass the limit, the process holding the lock scans the directory (names and
``stat`` only, never the contents), deletes the least recently used files (mtime is the LRU clock:
stores touch a file when they use it) until the total is under the low-water mark, and rewrites
``usage`` from what the scan found. So ``usage`` heals itself: a process killed between reserving
and writing leaves the count high only until the next scan. Files a process has pinned (open decoded
contents, chunks being written) are never chosen.

Single flight across processes. :meth:`try_claim` takes a non-blocking lock on one byte of
``lock`` chosen by hashing a key; the owner fetches, writes the file, then releases. Another
process that fails to claim the key waits for the file to appear (or for the claim to be free:
the kernel drops the locks of a process that dies). OFD locks belong to an open file description,
so threads of one process do not exclude each other with them: in-process exclusion is the
callers' (single-flight tables on the trio thread, and ``_budget_mutex`` for the budget).

Concurrency contract: ``reserve``/``release``/``scan`` block (file locks, directory walks) and
run on worker threads; ``try_claim``/``unclaim``/``pin``/``unpin`` never block and run on the trio
thread. Nothing here imports trio.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from blobmount import defaults
from blobmount.daemon import metrics
from blobmount.errors import UsageError

log = logging.getLogger(__name__)


def is_disk_trouble(exc: OSError) -> bool:
    return exc.errno in DISK_ERRNOS


def temp_path(final: Path) -> Path:
    """Where a cache file is written before its rename: beside it (the rename stays atomic), named
    for the writing process and moment (writers never share one), ending in ``.tmp`` (scans count
    it from the start and sweep it once its writer is gone: :data:`TMP_MAX_AGE_S`)."""
    return final.with_name(f"{final.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")


DEFAULT_CACHE_SIZE_BYTES = defaults.CACHE_SIZE_BYTES
LOW_WATER = 0.9  # an eviction frees down to this fraction of the limit, so scans stay rare
TMP_MAX_AGE_S = 3600.0  # a *.tmp older than this belongs to a dead process (writes take seconds)
# What "the disk will not take this" looks like, for every writer of the cache: full, over quota,
# read-only, the directory deleted or replaced under us, an I/O error, permissions changed. Each
# makes a writer fall back (chunks stay in memory, a decode is served without the store) instead
# of failing the read; any other OSError is a bug worth its traceback.
DISK_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EIO, errno.EACCES, errno.EPERM}
)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86_64/aarch64 (l_type, l_whence, l_start, l_len, l_pid)
_CLAIM_BASE = 1 << 20  # claim locks live above the budget lock's byte 0
_CLAIM_SPAN = 1 << 60


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


def _lock(fd: int, start: int, kind: int, wait: bool) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


@dataclass(frozen=True, slots=True)
class CachedFile:
    path: Path
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class Usage:
    accounted_bytes: int
    limit_bytes: int


class CacheDir:
    """The directory, its shared budget and its cross-process claims (module docstring)."""

    STORES = ("chunks", "content")  # subdirectories whose files count against the budget

    def __init__(self, root: Path, limit_bytes: int = DEFAULT_CACHE_SIZE_BYTES) -> None:
        self.root = prepare_cache_dir(root)
        self.limit_bytes = limit_bytes
        try:
            self._lock_fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UsageError(f"cache dir {root}: cannot open its lock file: {exc.strerror}") from exc
        self._budget_mutex = threading.Lock()
        self._usage: int | None = None
        self._pins: dict[Path, int] = {}
        self.evicted_files = 0  # counters for status and metrics
        self.evicted_bytes = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
        if self._usage is not None:
            with contextlib.suppress(OSError):
                os.close(self._usage)

    def subdir(self, name: str) -> Path:
        """``root/name``, created 0700 (again, if someone deleted it under a running mount)."""
        path = self.root / name
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    # -- pins (trio thread or any thread; a dict update is atomic under the GIL) ---------------

    def pin(self, path: Path) -> None:
        self._pins[path] = self._pins.get(path, 0) + 1

    def unpin(self, path: Path) -> None:
        left = self._pins.get(path, 0) - 1
        if left > 0:
            self._pins[path] = left
        else:
            self._pins.pop(path, None)

    # -- claims --------------------------------------------------------------------------------

    @staticmethod
    def _claim_offset(key: bytes) -> int:
        return _CLAIM_BASE + xxhash.xxh3_64_intdigest(key) % _CLAIM_SPAN

    def try_claim(self, key: bytes) -> bool:
        """Claim `key` for this process (non-blocking); False when another process holds it."""
        return _lock(self._lock_fd, self._claim_offset(key), fcntl.F_WRLCK, wait=False)

    def unclaim(self, key: bytes) -> None:
        with contextlib.suppress(OSError):
            _lock(self._lock_fd, self._claim_offset(key), fcntl.F_UNLCK, wait=False)

    # -- the budget (worker threads) -----------------------------------------------------------

    @contextlib.contextmanager
    def _budget(self) -> Iterator[None]:
        with self._budget_mutex:
            _lock(self._lock_fd, 0, fcntl.F_WRLCK, wait=True)
            try:
                yield
            finally:
                _lock(self._lock_fd, 0, fcntl.F_UNLCK, wait=False)

    def _usage_fd(self) -> int:
        """The usage file, opened once (and again if someone deleted the directory under us)."""
        if self._usage is not None and os.path.exists(self.root / "usage"):
            return self._usage
        if self._usage is not None:
            os.close(self._usage)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._usage = os.open(self.root / "usage", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._usage

    def _read_usage(self) -> int | None:
        raw = os.pread(self._usage_fd(), 8, 0)
        return int.from_bytes(raw, "little") if len(raw) == 8 else None

    def _write_usage(self, total: int) -> None:
        # 8 aligned bytes in place, under the lock: readers never see a torn value in practice,
        # and a damaged count is healed by the next scan anyway
        os.pwrite(self._usage_fd(), max(0, total).to_bytes(8, "little"), 0)

    def accounted_bytes(self) -> int:
        """The shared count as it stands, without the lock (for metrics: never blocks)."""
        try:
            return self._read_usage() or 0
        except OSError:
            return 0

    def usage(self) -> Usage:
        with self._budget():
            total = self._read_usage()
            if total is None:
                total = self._resync_locked()
        return Usage(total, self.limit_bytes)

    def reserve(self, size: int) -> bool:
        """Account `size` bytes about to be written; evict to make room. False when they cannot
        fit even after eviction (the caller keeps the data in memory instead)."""
        if size > self.limit_bytes:
            return False
        with self._budget():
            total = self._read_usage()
            if total is None:
                total = self._resync_locked()
            if total + size > self.limit_bytes:
                total = self._evict_locked(int(self.limit_bytes * LOW_WATER) - size)
                if total + size > self.limit_bytes:
                    return False
            self._write_usage(total + size)
        return True

    def commit(self, tmp: Path, final: Path) -> None:
        """Rename a reserved, fully written temp file into place (under the budget lock, so that a
        scan sees it either as the temp file or as the final one, never as neither)."""
        with self._budget():
            os.rename(tmp, final)

    def release(self, size: int) -> None:
        """`size` bytes were deleted by their store."""
        with self._budget():
            total = self._read_usage()
            if total is not None:
                self._write_usage(total - size)

    def resync(self) -> int:
        """Recount the directory (start-up, after a crash, `cache status`); returns the total."""
        with self._budget():
            return self._resync_locked()

    def prune(self, target_bytes: int) -> tuple[int, int]:
        """Evict least recently used files until at most `target_bytes` remain; (files, bytes) freed."""
        with self._budget():
            files, freed = self.evicted_files, self.evicted_bytes
            self._evict_locked(target_bytes)
            return self.evicted_files - files, self.evicted_bytes - freed

    def scan(self) -> list[CachedFile]:
        """Every cached file (names and stat only); stale temp files are deleted on the way."""
        out: list[CachedFile] = []
        now = time.time()
        for store in self.STORES:
            top = self.root / store
            for dirpath, _dirs, names in os.walk(top):
                for name in names:
                    path = Path(dirpath) / name
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    if name.endswith(".tmp") and now - st.st_mtime > TMP_MAX_AGE_S:
                        path.unlink(missing_ok=True)
                        continue
                    out.append(CachedFile(path, st.st_size, st.st_mtime))
        return out

    def _resync_locked(self) -> int:
        total = sum(f.size for f in self.scan())
        self._write_usage(total)
        return total

    def _evict_locked(self, target: int) -> int:
        files = self.scan()
        total = sum(f.size for f in files)
        if total > target:
            victims = sorted(
                (f for f in files if not f.path.name.endswith(".tmp") and f.path not in self._pins),
                key=lambda f: f.mtime,
            )
            for victim in victims:
                if total <= target:
                    break
                try:
                    victim.path.unlink()
                except FileNotFoundError:
                    pass  # another process got there first; its size is gone either way
                except OSError as exc:
                    log.warning("cache: cannot evict %s: %s", victim.path, exc.strerror)
                    continue
                total -= victim.size
                self.evicted_files += 1
                self.evicted_bytes += victim.size
                store = "content" if victim.path.parent.parent.name == "content" else "chunk"
                metrics.CACHE_EVICTIONS.labels(store=store).inc()
                metrics.CACHE_EVICTED_BYTES.labels(store=store).inc(victim.size)
        self._write_usage(total)
        return total
