"""The chunk store: a remote data blob's bytes, cut into fixed-size chunks, on disk and in memory.

A chunk is keyed by data-blob digest + chunk size + chunk index (``chunks/<digest hex>-<size>/<index>``),
so every mount and every daemon naming the same cache directory shares it, and archives that share
a data blob share its chunks. Only sources tied to a verified digest (a registry blob requested by
digest) may write here: a local ``data.blob`` never does (DESIGN §5).

File format: the chunk's bytes, then a 16-byte trailer: ``xxh3_64`` of the bytes and the magic
``BMCHNK01``. A chunk is loaded whole and its trailer checked before any of it is served; a file of
the wrong length, with a bad magic or a bad checksum is deleted with a warning and reported as a
miss (refetched), never served. Chunks appear by ``rename`` of a complete ``*.tmp`` in the same
directory, so no reader ever opens a half-written chunk, before or after a ``kill -9``; there is no
fsync: a chunk torn by a power cut fails its checksum, which turns it into a miss.

Memory tier: the last chunks used (``memory_bytes``, per mount) stay in memory, so a sequential
reader's 128 KiB requests cost one disk load per chunk, and a cache disk that is full or gone
(ENOSPC, EROFS, the directory deleted) degrades to serving from memory, with one warning.

Concurrency contract: ``load``/``store``/``trailer_digest``/``purge_disk`` block and run on worker
threads; they touch the file system and the CacheDir budget, never the memory tier. The memory tier
(``memory_get``/``memory_put``/``forget``) and ``on_disk`` run on the trio thread only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from pathlib import Path
from typing import BinaryIO

import xxhash

from blobmount import defaults
from blobmount.cache.space import CacheDir, is_disk_trouble, temp_path
from blobmount.daemon import metrics
from blobmount.lru import LRU

log = logging.getLogger(__name__)

# Measured through netshape (10 ms, 1 Gbit) with the suite, `BLOBMOUNT_CHUNK_SIZE=S python -m bench
# --networks netns --peers blobmount-reg`: 256K / 1M / 4M chunks gave 25.5k-file tree read-all (-P1)
# 10.0 / 8.7 / 8.1 s in 182 / 53 / 15 requests, sequential 1 GiB 10.6 / 10.1 / 10.6 s, 2,000 random
# 4 KiB reads 31.7 / 22.7 / 17.0 s fetching 392 / 868 / 1024 MiB. 1 MiB: within a few percent of the
# best for whole trees and streams, a quarter of 4M's over-fetch for scattered reads.
DEFAULT_CHUNK_SIZE_BYTES = defaults.CHUNK_SIZE_BYTES
DEFAULT_MEMORY_BYTES = 64 << 20  # hot chunks per mount; also the budget when the disk is unusable
_TRAILER = struct.Struct("<Q8s")
_MAGIC = b"BMCHNK01"
TRAILER_BYTES = _TRAILER.size
_DEGRADED_WARN_INTERVAL_S = 60.0  # one warning a minute while the disk refuses chunks


class _NoRoom(Exception):
    """The budget refused a chunk (internal to ChunkStore.store)."""


def chunk_digest(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


class ChunkStore:
    """Chunks of one data blob (module docstring)."""

    def __init__(
        self,
        cache: CacheDir | None,
        blob_hex: str,
        blob_size: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE_BYTES,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> None:
        """`cache` None keeps chunks in memory only (a source whose bytes no digest vouches for)."""
        if chunk_size <= 0:
            raise ValueError("chunk size must be positive")
        self.cache = cache
        self.blob_hex = blob_hex
        self.blob_size = blob_size
        self.chunk_size = chunk_size
        self.count = (blob_size + chunk_size - 1) // chunk_size
        self.memory_bytes = max(memory_bytes, 2 * chunk_size)
        self._name = f"{blob_hex}-{chunk_size}"
        # the hot-path form of a chunk's path (pathlib costs microseconds per call, per read)
        self._prefix = None if cache is None else f"{cache.root}/chunks/{self._name}/"
        self._memory: LRU[int, bytes] = LRU(self.memory_bytes, len)
        self._degraded_since: float | None = None
        self._last_warning = 0.0
        self.disk_loads = 0
        self.disk_stores = 0
        self.bad_chunks = 0

    # -- geometry ------------------------------------------------------------------------------

    def span(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.blob_size)

    def length(self, index: int) -> int:
        start, end = self.span(index)
        return end - start

    def claim_key(self, index: int) -> bytes:
        return f"{self._name}/{index}".encode()

    @property
    def directory(self) -> Path | None:
        return None if self.cache is None else self.cache.root / "chunks" / self._name

    def path(self, index: int) -> Path | None:
        return None if self._prefix is None else Path(self._prefix + str(index))

    # -- memory tier (trio thread) -------------------------------------------------------------

    def memory_get(self, index: int) -> bytes | None:
        return self._memory.get(index)

    def memory_put(self, index: int, data: bytes) -> None:
        self._memory.put(index, data)

    def in_memory(self, index: int) -> bool:
        return index in self._memory

    def forget(self, index: int) -> None:
        self._memory.pop(index)

    @property
    def memory_used(self) -> int:
        return self._memory.used

    def on_disk(self, index: int) -> bool:
        """Cheap presence test (one stat); the trailer is checked when the chunk is loaded."""
        return self._prefix is not None and os.path.exists(self._prefix + str(index))

    @property
    def degraded(self) -> bool:
        return self._degraded_since is not None

    # -- disk (worker threads) -----------------------------------------------------------------

    def load(self, index: int) -> bytes | None:
        """The chunk from disk, checked; None on a miss (a bad file is deleted and is a miss)."""
        path = self.path(index)
        if path is None:
            return None
        want = self.length(index)
        try:
            with open(path, "rb") as f:
                raw = f.read(want + TRAILER_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._disk_trouble(f"cannot read {path}: {exc.strerror}")
            return None
        if len(raw) == want + TRAILER_BYTES:
            digest, magic = _TRAILER.unpack_from(raw, want)
            data = raw[:want]
            if magic == _MAGIC and chunk_digest(data) == digest:
                self.disk_loads += 1
                with contextlib.suppress(OSError):
                    os.utime(path)  # the LRU clock
                return data
        self.bad_chunks += 1
        metrics.VERIFY_FAILURES.labels(what="chunk").inc()
        log.warning("chunk cache: %s failed its checksum or length; discarded and refetched", path)
        self._delete(path)
        return None

    def trailer_digest(self, index: int) -> int | None:
        """The stored xxh3 of a chunk without reading its bytes (verified records compare these)."""
        path = self.path(index)
        if path is None:
            return None
        want = self.length(index)
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size != want + TRAILER_BYTES:
                    return None
                f.seek(want)
                digest, magic = _TRAILER.unpack(f.read(TRAILER_BYTES))
        except (OSError, struct.error):
            return None
        return int(digest) if magic == _MAGIC else None

    def store(self, index: int, data: bytes, digest: int | None = None) -> bool:
        """Write a chunk crash-safely; False when it stays in memory only (budget or disk trouble)."""
        path = self.path(index)
        if path is None or self.cache is None:
            return False
        size = len(data) + TRAILER_BYTES
        trailer = _TRAILER.pack(chunk_digest(data) if digest is None else digest, _MAGIC)
        tmp = temp_path(path)
        reserved = False
        try:
            try:
                f = open(tmp, "xb")  # noqa: SIM115 - closed below, before the rename
            except FileNotFoundError:  # the first chunk of this blob, or the directory was deleted
                self.cache.subdir(f"chunks/{self._name}")
                f = open(tmp, "xb")  # noqa: SIM115
            with f:
                f.truncate(size)  # visible to scans at its final size before it is reserved
                reserved = self.cache.reserve(size)
                if not reserved:
                    raise _NoRoom
                f.write(data)
                f.write(trailer)
            self.cache.commit(tmp, path)
        except _NoRoom:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._disk_trouble(f"--cache-size {self.cache.limit_bytes} bytes leaves no room")
            return False
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if reserved:
                self._release(size)
            if is_disk_trouble(exc):
                self._disk_trouble(f"cannot write {path.parent}: {exc.strerror}")
                return False
            raise
        self.disk_stores += 1
        if self._degraded_since is not None:
            log.warning("chunk cache: %s accepts chunks again", self.cache.root)
            self._degraded_since = None
        return True

    def purge_disk(self, first: int, last: int) -> None:
        """Delete chunks [first, last] from disk (a file failed verification: refetch its bytes)."""
        for index in range(first, last + 1):
            path = self.path(index)
            if path is not None:
                self._delete(path)

    def _delete(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            return
        self._release(size)

    def _release(self, size: int) -> None:
        if self.cache is not None:
            try:
                self.cache.release(size)
            except OSError as exc:
                log.debug("chunk cache: cannot update usage: %s", exc.strerror)

    def _disk_trouble(self, why: str) -> None:
        now = time.monotonic()
        if self._degraded_since is None:
            self._degraded_since = now
        if now - self._last_warning >= _DEGRADED_WARN_INTERVAL_S:
            self._last_warning = now
            log.warning(
                "chunk cache: %s; serving from memory (at most %d MiB per mount) until the disk takes chunks again",
                why,
                self.memory_bytes >> 20,
            )


class WholeBlob:
    """A data blob kept whole in the cache (``chunks/<digest hex>-whole``): the fallback for a
    registry that answers ranges with the whole body. The caller streams the body in (on worker
    threads) and commits only once the digest checked out; the budget counts it like any chunk,
    and the file, renamed into place, is never half there."""

    def __init__(self, cache: CacheDir, blob_hex: str, size: int) -> None:
        self.cache = cache
        self.size = size
        self.path = cache.root / "chunks" / f"{blob_hex}-whole"
        self._tmp = temp_path(self.path)
        self._file: BinaryIO | None = None

    def present(self) -> bool:
        return self.path.exists()

    def begin(self) -> bool:
        """Reserve the space and open the temp file; False when the blob cannot fit."""
        if not self.cache.reserve(self.size):
            return False
        self.cache.subdir("chunks")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit() or abort()
        return True

    def write(self, block: bytes) -> None:
        assert self._file is not None
        self._file.write(block)

    def commit(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        self.cache.commit(self._tmp, self.path)

    def abort(self) -> None:
        """Undo begin() (the body broke, or did not hash to its digest)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            self._tmp.unlink()
        self.cache.release(self.size)
