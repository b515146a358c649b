"""Files verified whole before their first byte is served, zstd or small: two of the reader's strategies.

- :class:`SmallFiles`: a file of at most ``SMALL_DECODE_BYTES`` (raw or zstd) is loaded whole on
  its first read (one request for a remote source instead of a verification pass plus the reads),
  verified, and served from memory; the verified contents are kept in a bounded LRU by sha256.
  Programs read a directory's small files one after another, and they are neighbours in the data
  blob: their reads share one read-ahead state per directory (prefetch of the next files).
- :class:`DecodedFiles`: a larger zstd file verified before it is served (``strict``, or at most
  ``verify_threshold``) is decoded once into the content store (later opens are served from it);
  when the store cannot take it, into memory up to ``SPILL_DECODE_BYTES``, else EIO.

Bad bytes go through integrity's one rule (read once more from the origin, then poison).
Concurrency: the trio thread; decoding runs on worker threads (small frames inline).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from blobmount.cache import ContentStore, StoreUnavailable
from blobmount.errors import LimitExceeded, SourceError, Unservable
from blobmount.index import COMPRESSION_ZSTD, Entry
from blobmount.index.paths import show
from blobmount.integrity import Integrity
from blobmount.lru import LRU
from blobmount.readahead import ReadHint
from blobmount.sources.base import RangeSource

if TYPE_CHECKING:
    from blobmount.reader import Handle

log = logging.getLogger("blobmount.reader")

SMALL_DECODE_BYTES = 1 << 20  # zstd files up to this size are decoded into memory, not the store:
# writing and renaming a store file costs more than decoding such a file again
MEMORY_BUDGET_BYTES = 64 << 20  # decoded small files kept in memory (LRU), per mount
SPILL_DECODE_BYTES = 256 << 20  # a zstd file the content store cannot take (disk full) may be decoded
# into memory up to this size; larger ones fail with EIO and a log line naming both limits
DIR_HINTS = 256  # directories whose small-file reads are followed for prefetch (LRU)
INLINE_DECODE_BYTES = 128 << 10  # zstd frames this small are decoded on the trio thread: measured,
# a worker-thread hop (~60 us) cost more than decoding and hashing a typical source file
PREAD_INLINE_BYTES = 1 << 20  # a pread of the content store this small runs on the trio thread


class SmallFiles:
    """Small files, loaded whole, verified, served from memory (module docstring)."""

    def __init__(
        self,
        source: RangeSource,
        integrity: Integrity,
        dir_span: Callable[[bytes], tuple[int, int] | None] | None = None,
    ) -> None:
        self.source = source
        self.integrity = integrity
        self.dir_span = dir_span
        self._dir_hints: OrderedDict[bytes, ReadHint | None] = OrderedDict()
        self._memory: LRU[bytes, bytes] = LRU(MEMORY_BUDGET_BYTES, len)  # sha256 -> content

    async def open(self, handle: Handle) -> None:
        # Loaded (and verified) on the first read, not here: an open whose pages the kernel
        # already holds never reads, and loading at open made a warm read-all of a small-file
        # tree 2.7x slower (bench/fs_local.py).
        handle.small = True

    async def read(self, handle: Handle, offset: int, end: int) -> bytes:
        entry = handle.entry
        while handle.content is None:  # single-flight per handle
            if handle.loading is not None:  # the kernel's read-ahead sends reads in parallel
                await handle.loading.wait()
                self.integrity.check_poison(entry)
                continue
            loading = handle.loading = trio.Event()
            try:
                hint = self._dir_hint(entry)
                if entry.compression == COMPRESSION_ZSTD:
                    handle.content = await self.decode(entry, hint)
                else:
                    handle.content = await self._load_raw(entry, hint)
            finally:
                handle.loading = None
                loading.set()
        return handle.content[offset:end]

    def close(self, handle: Handle) -> None:
        pass

    def _dir_hint(self, entry: Entry) -> ReadHint | None:
        """The read-ahead state of the directory a small file sits in (remote sources only): the
        files of a directory are neighbours in the data blob, and programs read them in a row."""
        if self.integrity.remote is None or self.dir_span is None:
            return None
        parent = entry.path.rpartition(b"/")[0]
        if parent in self._dir_hints:
            self._dir_hints.move_to_end(parent)
            return self._dir_hints[parent]
        span = self.dir_span(parent)
        hint = ReadHint(span[0], span[1], directory=True) if span is not None else None
        self._dir_hints[parent] = hint
        if len(self._dir_hints) > DIR_HINTS:
            self._dir_hints.popitem(last=False)
        return hint

    def _remembered(self, entry: Entry) -> bytes | None:
        cached = self._memory.get(entry.hash)
        if cached is not None:
            self.integrity.verified.add(entry.number)
        return cached

    async def decode(self, entry: Entry, hint: ReadHint | None = None) -> bytes:
        """A zstd file decoded and verified in memory, kept in a bounded LRU by sha256. A remote
        file's compressed bytes are fetched first, on this thread: the decoder's thread then never
        waits for the network. Frames of at most ``INLINE_DECODE_BYTES`` are read and decoded
        right here: a thread hop costs more than decoding them."""
        cached = self._remembered(entry)
        if cached is not None:
            return cached
        inline = entry.data_size <= INLINE_DECODE_BYTES
        prefetch = self.integrity.remote is not None and entry.data_size <= SPILL_DECODE_BYTES
        data = await self.integrity.decode_in_memory(entry, hint, prefetch=prefetch, inline=inline)
        self._memory.put(entry.hash, data)
        return data

    async def _load_raw(self, entry: Entry, hint: ReadHint | None = None) -> bytes:
        """A small raw file fetched whole once, verified, and served from memory: one request for
        a remote source instead of a verification pass plus the reads, no repeated preads locally."""
        cached = self._remembered(entry)
        if cached is not None:
            return cached
        data = await self.integrity.load_raw(entry, hint)
        self._memory.put(entry.hash, data)
        return data


class DecodedFiles:
    """Large zstd files decoded and verified whole before they are served (module docstring)."""

    def __init__(self, store: ContentStore, integrity: Integrity, small: SmallFiles) -> None:
        self.store = store
        self.integrity = integrity
        self.small = small  # decodes into memory when the store cannot take a file
        self._unservable: set[int] = set()  # files beyond every size limit, logged once (Unservable)

    async def open(self, handle: Handle) -> None:
        entry = handle.entry
        try:
            handle.content_fd = await self.open_decoded(entry)
        except (StoreUnavailable, LimitExceeded) as exc:
            if entry.original_size > SPILL_DECODE_BYTES:
                err = Unservable(
                    f"{show(entry.path)}: {exc}, and its {entry.original_size} bytes exceed the"
                    f" {SPILL_DECODE_BYTES}-byte in-memory limit for decoded files; not served"
                )
                if entry.number not in self._unservable:  # one line per file, however often it is read
                    self._unservable.add(entry.number)
                    log.error("%s", err)
                raise err from exc
            log.warning("%s: %s; decoding it into memory instead", show(entry.path), exc)
            handle.content = await self.small.decode(entry)

    async def read(self, handle: Handle, offset: int, end: int) -> bytes:
        if handle.content is not None:
            return handle.content[offset:end]
        return await pread(handle, offset, end)

    def close(self, handle: Handle) -> None:
        if handle.content_fd is not None:
            self.store.release(handle.entry.hash.hex(), handle.content_fd)
            handle.content_fd = None

    async def open_decoded(self, entry: Entry) -> int:
        """An fd of the file decoded in the content store: decoded (and verified) now if it is not
        there yet."""
        key = entry.hash.hex()
        for _ in range(2):  # a fill evicted before it was opened is filled once more
            fd = await self.store.open(key)
            if fd is not None:
                return fd
            await self.integrity.decode_into_store(entry)
        fd = await self.store.open(key)
        if fd is not None:
            return fd
        raise SourceError(f"{show(entry.path)}: decoded content vanished from the cache twice")


async def pread(handle: Handle, offset: int, end: int) -> bytes:
    """Bytes of a decoded file from its content-store fd (a large read on a worker thread)."""
    fd = handle.content_fd
    assert fd is not None
    if end - offset <= PREAD_INLINE_BYTES:
        return os.pread(fd, end - offset, offset)
    return await trio.to_thread.run_sync(os.pread, fd, end - offset, offset)
