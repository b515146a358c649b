"""(entry, offset, size) -> bytes: one strategy per kind of entry (DESIGN §5).

- small files (at most ``SMALL_DECODE_BYTES``, raw or zstd): loaded whole on the first read,
  verified, and served from memory (smallfiles.py);
- large zstd files verified before they are served (``strict``, or at most ``verify_threshold``):
  decoded once into the content store, or into memory when the store cannot take them
  (smallfiles.py, :class:`~blobmount.smallfiles.DecodedFiles`);
- larger zstd files otherwise: served while they decode (streaming.py over decode.py);
- large raw files: slices of the data blob, verified whole first or hashed as they are read
  (rawfiles.py).

What is verified when, and what a mismatch does, is integrity/: this module picks the strategy at
open and hands each read to it. A file that failed verification is EIO at every open and read.

Concurrency: called only from the trio thread; decoding and hashing of whole files run on worker
threads, which touch nothing of this object but read through the source.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from blobmount import defaults
from blobmount.cache import ContentStore
from blobmount.decode import Decode
from blobmount.errors import SourceError
from blobmount.index import COMPRESSION_ZSTD, Entry
from blobmount.index.paths import show
from blobmount.integrity import EMPTY_SHA256, Integrity, VerifyPolicy
from blobmount.integrity.whole import mismatch
from blobmount.rawfiles import RawFiles
from blobmount.readahead import ReadHint
from blobmount.smallfiles import SMALL_DECODE_BYTES, DecodedFiles, SmallFiles
from blobmount.sources.base import RangeSource
from blobmount.streaming import StreamedFiles

BLOCK_BYTES = 1 << 20  # unit of whole-file streaming (stream_verified): bounded memory, few calls
DEFAULT_VERIFY_THRESHOLD_BYTES = defaults.VERIFY_THRESHOLD_BYTES


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    verify: VerifyPolicy = defaults.VERIFY_POLICY
    verify_threshold: int = DEFAULT_VERIFY_THRESHOLD_BYTES
    wait_s: float = defaults.TIMEOUT_S  # --timeout: a read waiting for a decode (or a re-read) fails (EIO) after it


class Strategy(Protocol):
    """How one kind of entry is served (module docstring)."""

    async def open(self, handle: Handle) -> None: ...

    async def read(self, handle: Handle, offset: int, end: int) -> bytes: ...

    def close(self, handle: Handle) -> None: ...


@dataclass(slots=True)
class Handle:
    """An open file: the entry, the strategy serving it, and that strategy's state for this open."""

    entry: Entry
    kind: Strategy | None = None  # None: an empty file
    content_fd: int | None = None  # a decoded file's fd into the content store
    content: bytes | None = None  # a small file, verified (and decoded) in memory on first read
    small: bool = False  # original_size <= SMALL_DECODE_BYTES: served from `content`
    loading: trio.Event | None = None  # set while one read loads `content`
    hint: ReadHint | None = None  # read-ahead state of a large raw file
    generation: int = 0  # the file's distrust count at open: a later distrust fails this handle
    stream: bool = False  # a large zstd file served while it decodes (decode.py)
    decode: Decode | None = None  # the decode this handle reads from, once it has read


class Reader:
    """Serves entry bytes from one archive's data source; see the module docstring."""

    def __init__(
        self,
        source: RangeSource,
        store: ContentStore,
        config: ReaderConfig | None = None,
        drop_pages: Callable[[Entry], None] | None = None,
        dir_span: Callable[[bytes], tuple[int, int] | None] | None = None,
        recorder: Callable[[Entry, int, int], None] | None = None,
    ) -> None:
        """`drop_pages(entry)`: the kernel may hold pages of `entry` not to be trusted (the
        filesystem's queue, kernel.py; None without a kernel). `dir_span(path)` gives the
        data-blob range of a directory's files (contiguous: the blob is in path order), for
        prefetching small files read one after another. `recorder` is told of every read that
        reaches the daemon (--record-profile: profile.Recorder.read)."""
        self.recorder = recorder
        self.source = source
        self.store = store
        self.config = config or ReaderConfig()
        self.integrity = Integrity(source, store, self.config, drop_pages)
        self.small = SmallFiles(source, self.integrity, dir_span)
        self.decoded = DecodedFiles(store, self.integrity, self.small)
        self.streamed = StreamedFiles(source, store, self.integrity)
        self.raw = RawFiles(source, self.integrity)

    def attach(self, nursery: trio.Nursery) -> None:
        """The long-lived nursery for background work: verification, streaming decodes."""
        self.integrity.nursery = nursery

    def state(self, entry: Entry) -> str:
        """'verified', 'poisoned' or 'unverified' (exposed as the user.blobmount.verified xattr)."""
        return self.integrity.state(entry)

    def verifies_lazily(self, entry: Entry) -> bool:
        return self.integrity.verifies_lazily(entry)

    def lazy_above(self) -> int | None:
        return self.integrity.lazy_above()

    # -- handles -------------------------------------------------------------------------------

    def _strategy(self, entry: Entry) -> Strategy | None:
        if not entry.original_size:
            return None
        if entry.original_size <= SMALL_DECODE_BYTES:
            return self.small
        if entry.compression != COMPRESSION_ZSTD:
            return self.raw
        # served as the decoder passes each byte (verified at the end) unless verified before it
        # is served; needs the nursery the decodes run in
        if not self.integrity.upfront(entry) and self.integrity.nursery is not None:
            return self.streamed
        return self.decoded

    async def open(self, entry: Entry) -> Handle:
        self.integrity.check_poison(entry)
        handle = Handle(entry, self._strategy(entry))
        if handle.kind is not None:
            await handle.kind.open(handle)
        return handle

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        data = await self.read_view(handle, offset, size)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_view(self, handle: Handle, offset: int, size: int) -> bytes | memoryview:
        """:meth:`read`, for a caller that hands the bytes on at once and keeps nothing (the
        kernel's reads, fs.py): a streamed file's fresh bytes come as a view of its decoder's
        buffer, without a copy (StreamedFiles.read_view)."""
        entry = handle.entry
        self.integrity.check_poison(entry)
        end = min(offset + size, entry.original_size)
        if offset >= end or handle.kind is None:
            return b""
        if self.recorder is not None:
            self.recorder(entry, offset, end)
        if handle.kind is self.streamed:
            return await self.streamed.read_view(handle, offset, end)
        return await handle.kind.read(handle, offset, end)

    def close(self, handle: Handle) -> None:
        if handle.kind is not None:
            handle.kind.close(handle)

    # -- whole files (cat) ---------------------------------------------------------------------

    async def stream_verified(self, entry: Entry) -> AsyncIterator[bytes]:
        """Every byte of `entry`, yielded only once the whole file has been verified: nothing of a
        bad file is ever produced. Memory stays at one block."""
        if entry.original_size == 0:
            if entry.hash != EMPTY_SHA256:
                raise mismatch(entry, EMPTY_SHA256)
            return
        handle = await self.open(entry)
        try:
            if handle.stream and entry.number not in self.integrity.verified:
                await self.streamed.recheck(entry)  # nothing before the verdict
                self.integrity.check_poison(entry)
            elif handle.kind is self.raw:
                await self.integrity.verify_whole(entry)
            pos = 0
            check = hashlib.sha256()
            while pos < entry.original_size:
                block = await self.read(handle, pos, BLOCK_BYTES)
                if not block:
                    raise SourceError(f"{show(entry.path)}: ended early at byte {pos}")
                check.update(block)
                pos += len(block)
                yield block
            if check.digest() != entry.hash:  # the source changed between the two passes
                raise mismatch(entry, check.digest())
        finally:
            self.close(handle)
