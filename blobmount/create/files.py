"""One file archived: read in fixed-size blocks through a ring of buffers, hashed on a thread of
its own, compressed (zstd) or not by the reference's rule, its bytes handed on in order; and the
data blob's writer, hashed the same way. Memory grows with neither the file's size nor the tree's."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from blobmount.create.options import CreateOptions
from blobmount.create.walk import Source
from blobmount.errors import SourceError
from blobmount.index import COMPRESSION_NONE, COMPRESSION_ZSTD, EntryRecord
from blobmount.index.paths import show

BLOCK_BYTES = 1 << 20
READ_BUFFERS = 3  # one being read, one being hashed, one spare: hashers lag at most one block
THREAD_HASH_MIN_BYTES = 256 << 10  # below this, hashing inline beats a thread hop


class Hasher:
    """sha256 fed in order from the reading thread, computed on a worker thread of its own.

    Two of these (one per file, one for the whole data blob) run on two cores while the main
    thread only reads and writes: hashlib releases the GIL on large updates, so create keeps up
    with tar instead of paying for two hashes in series. Small blocks are hashed inline (a thread
    hop costs more than they do)."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor | None) -> None:
        self._pool = pool  # None: always inline (a compression worker hashes on its own thread)
        self._hash = hashlib.sha256()
        self._pending: concurrent.futures.Future[None] | None = None

    def update(self, data: bytes | memoryview) -> None:
        """Hash `data`; the caller must leave it untouched until its next update() returns (the
        readers rotate over READ_BUFFERS buffers, so no block is ever copied)."""
        self._wait()
        if self._pool is None or len(data) < THREAD_HASH_MIN_BYTES:
            self._hash.update(data)
            return
        self._pending = self._pool.submit(self._hash.update, data)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def digest(self) -> bytes:
        self._wait()
        return self._hash.digest()


class BlobWriter:
    """Appends to the data blob and hashes it (see :class:`Hasher`)."""

    def __init__(self, out: BinaryIO, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self._out = out
        self._hash = Hasher(pool)
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        self._out.write(data)
        self.size += len(data)
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.digest().hex()


class Ring:
    """READ_BUFFERS read buffers, used in turn across files as well as within one.

    The hashers lag at most one block behind the reader, and the blob's hasher may still be
    hashing a file's last block when the next file's first block is read: restarting at the first
    buffer for each file overwrote that block mid-hash (a data_hash that matched no blob and
    changed from run to run). So the turn never restarts, and a read that finds the end of a
    file, filling nothing, does not take a turn."""

    def __init__(self) -> None:
        self._bufs = [bytearray(BLOCK_BYTES) for _ in range(READ_BUFFERS)]
        self._next = 0

    def blocks(self, f: BinaryIO, rel: bytes) -> Iterator[memoryview]:
        while True:
            buf = self._bufs[self._next]
            try:
                n = f.readinto(buf)  # type: ignore[attr-defined]
            except OSError as exc:
                raise SourceError(f"{show(rel)}: cannot read: {exc.strerror}") from exc
            if not n:
                return
            self._next = (self._next + 1) % len(self._bufs)
            yield memoryview(buf)[:n]


def compressor_for(opts: CreateOptions) -> zstandard.ZstdCompressor:
    """One per thread (a compressor is not shared); every one makes the same frame of the same file."""
    return zstandard.ZstdCompressor(level=opts.level, write_checksum=True)


@dataclass(frozen=True, slots=True)
class Stored:
    """What archiving one file found: the rest of its record is where the writer put it."""

    original: int
    hash: bytes
    st: os.stat_result
    zstd: bool

    def record(self, src: Source, offset: int, size: int) -> EntryRecord:
        return EntryRecord(
            path=src.rel,
            data_offset=offset,
            data_size=size,
            original_size=self.original,
            hash=self.hash,
            mode=self.st.st_mode & 0o777,
            uid=self.st.st_uid,
            gid=self.st.st_gid,
            mtime_ns=self.st.st_mtime_ns,
            compression=COMPRESSION_ZSTD if self.zstd else COMPRESSION_NONE,
        )


def open_source(full: bytes, rel: bytes) -> int:
    try:
        return os.open(full, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    except PermissionError:  # O_NOATIME needs ownership; retry without it
        try:
            return os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise SourceError(f"{show(rel)}: cannot open: {exc.strerror}") from exc
    except OSError as exc:
        raise SourceError(f"{show(rel)}: cannot open: {exc.strerror}") from exc


def archive_file(
    root: bytes,
    src: Source,
    opts: CreateOptions,
    ring: Ring,
    digest: Hasher,
    emit: Callable[[bytes | memoryview], None],
    compressor: zstandard.ZstdCompressor | None,
    advance: Callable[[int], None],
) -> Stored:
    """Read one file, hash it and hand its stored bytes (zstd or raw) to `emit`, in order.

    `emit` may get a view of a read buffer (raw files): it must be done with it when it returns or,
    like the blob writer, hash it no more than one block behind."""
    fd = open_source(os.path.join(root, src.rel), src.rel)
    strict = opts.change_detection == "strict"
    original = 0
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{show(src.rel)}: changed into a non-regular file while archiving")
        if strict and (st.st_dev, st.st_ino) != (src.st.st_dev, src.st.st_ino):
            raise SourceError(f"{show(src.rel)}: replaced by another file while archiving (--change-detection strict)")
        zstd = compressor is not None and opts.compresses(src.rel, st.st_size)
        if zstd and compressor is not None:
            chunker = compressor.chunker(size=st.st_size, chunk_size=BLOCK_BYTES)
            for block in ring.blocks(f, src.rel):
                digest.update(block)
                original += len(block)
                advance(len(block))
                for out in chunker.compress(block):
                    emit(out)
            if original:
                for out in chunker.finish():  # type: ignore[no-untyped-call]
                    emit(out)
        else:
            for block in ring.blocks(f, src.rel):
                digest.update(block)
                original += len(block)
                advance(len(block))
                emit(block)
        if strict:
            check_unchanged(src.rel, st, os.fstat(f.fileno()))
    if original != st.st_size:
        raise SourceError(f"{show(src.rel)}: changed size while archiving ({st.st_size} -> {original})")
    return Stored(original, digest.digest(), st, zstd and original > 0)


def check_unchanged(rel: bytes, before: os.stat_result, after: os.stat_result) -> None:
    """--change-detection strict, after reading: the reference's test (size, mtime, permissions)."""
    changes = []
    if after.st_size != before.st_size:
        changes.append(f"size {before.st_size} -> {after.st_size}")
    if after.st_mtime_ns != before.st_mtime_ns:
        changes.append("mtime moved")
    if stat.S_IMODE(after.st_mode) != stat.S_IMODE(before.st_mode):
        changes.append(f"mode {stat.S_IMODE(before.st_mode):o} -> {stat.S_IMODE(after.st_mode):o}")
    if changes:
        raise SourceError(f"{show(rel)}: changed while archiving ({', '.join(changes)}; --change-detection strict)")
