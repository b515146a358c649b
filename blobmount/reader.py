"""(entry, offset, size) -> bytes: raw slices, zstd decoding, sha256 verification (DESIGN §5).

Policy, per file:
- zstd, at most ``verify_threshold`` bytes, or any zstd file under ``verify="strict"``: decoded
  once (streaming decoder, output limited to ``original_size``), in memory or into the content
  store, verified before any byte is served.
- larger zstd files otherwise: served while they decode (decode.py: one decode per file shared by
  its handles, into a content-store temp file committed once verified, or a bounded ring when the
  store cannot take it); a read waits for the decoder at most ``wait_s``. The verdict comes at the
  end of the decode: a mismatch is a distrust as below (the read that completes the file fails,
  earlier opens fail, pages dropped, the file decoded whole from the origin before it is served
  again, then poisoned if it still mismatches).
- raw, at most ``verify_threshold`` bytes, or any raw file under ``verify="strict"``: the whole file
  is hashed on the first read, before a byte is returned.
- larger raw files under ``verify="lazy"`` (the default): served as read; hashed as the reads arrive
  in order (out-of-order reads are caught up from the source once everything has been read). The
  hash state is per file, not per open: it outlives the handles (``KEPT_PROGRESS`` files), because
  with ``keep_cache`` the kernel serves pages an earlier open was given without asking again, so
  a file read in pieces by several opens or processes is still verified once all of it was served;
  a state given up drops the file's pages with it (a later read is then hashed from byte 0).
- a mismatch found that way means bytes already served were wrong (*distrust*): the read that
  found it fails (EIO), and so does every later read through a handle opened before (its process
  may hold wrong bytes: a program that reads a file to its end never finishes with success and
  wrong bytes); ``on_poison`` lets the filesystem drop the pages the kernel holds; the file's chunks
  are purged and it is read whole once more from the origin (never a mirror, in the background and
  by the next read, which waits for it) before another byte is served. If that still mismatches it
  is poisoned for the life of this reader (every read EIO), one log line naming path and hashes.
  ``verify="background"`` also reads the rest of such a file in the background once it is opened,
  so it is verified without waiting for the reader (a mismatch found so is a distrust too).
- a remote source remembers which large files it verified, with the chunks they were read from
  (fetch.py), so a remount does not hash them again.

Concurrency: called only from the trio thread; decoding and hashing of whole files run on worker
threads, which touch nothing of this object but read through the source.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import trio
import zstandard

from blobmount import defaults
from blobmount.cache import ContentStore, StoreUnavailable
from blobmount.daemon import metrics
from blobmount.decode import Decode, RangeStream
from blobmount.errors import BlobmountError, IntegrityError, InvalidArchive, LimitExceeded, SourceError, Unservable
from blobmount.index import COMPRESSION_ZSTD, Entry
from blobmount.index.paths import show
from blobmount.lru import LRU
from blobmount.readahead import ReadHint
from blobmount.sources.base import Fetching, RangeSource
from blobmount.streaming import StreamingReads

log = logging.getLogger(__name__)
_OK = metrics.VERIFY_FILES.labels(result="ok")
_MISMATCH = metrics.VERIFY_FILES.labels(result="mismatch")

BLOCK_BYTES = 1 << 20  # unit of whole-file hashing and decoding: bounded memory, few calls
SMALL_DECODE_BYTES = 1 << 20  # zstd files up to this size are decoded into memory, not the store:
# writing and renaming a store file costs more than decoding such a file again
MEMORY_BUDGET_BYTES = 64 << 20  # decoded small files kept in memory (LRU), per mount
SPILL_DECODE_BYTES = 256 << 20  # a zstd file the content store cannot take (disk full) may be decoded
# into memory up to this size; larger ones fail with EIO and a log line naming both limits
DEFAULT_VERIFY_THRESHOLD_BYTES = defaults.VERIFY_THRESHOLD_BYTES
DIR_HINTS = 256  # directories whose small-file reads are followed for prefetch (LRU)
EARLY_BYTES = 16 << 20  # per file being verified lazily: out-of-order reads kept until hashable
KEPT_PROGRESS = 256  # lazily served files whose hash state outlives their last handle (LRU)
COMPLETE_BYTES = 64 << 20  # a file served in part and closed is hashed to its end, from the cache,
# when at most this much of it is left (bounded background work; never a fetch)
COMPLETE_QUEUE = 16  # such completions waiting at most (one runs at a time); more are not started
INLINE_DECODE_BYTES = 128 << 10  # zstd frames this small are decoded on the trio thread: measured,
# a worker-thread hop (~60 us) cost more than decoding and hashing a typical source file
EMPTY_SHA256 = hashlib.sha256(b"").digest()

VerifyPolicy = Literal["lazy", "strict", "background"]


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    verify: VerifyPolicy = defaults.VERIFY_POLICY
    verify_threshold: int = DEFAULT_VERIFY_THRESHOLD_BYTES
    wait_s: float = defaults.TIMEOUT_S  # --timeout: a read waiting for a decode (or a re-read) fails (EIO) after it


@dataclass(slots=True)
class _Progress:
    """Lazy verification state of one raw file: what of it was served, and hashed so far."""

    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    hashed_upto: int = 0
    covered: list[tuple[int, int]] = field(default_factory=list)  # merged ranges beyond hashed_upto
    early: dict[int, bytes] = field(default_factory=dict)  # reads that arrived ahead of hashed_upto
    early_bytes: int = 0
    users: int = 0
    finishing: bool = False  # one task owns the final catch-up; the hasher is frozen for others


@dataclass(slots=True)
class Handle:
    """An open file: the entry and, for zstd, an fd into the content store."""

    entry: Entry
    content_fd: int | None = None
    content: bytes | None = None  # a small file, verified (and decoded) in memory on first read
    small: bool = False  # original_size <= SMALL_DECODE_BYTES: served from `content`
    loading: trio.Event | None = None  # set while one read loads `content`
    hint: ReadHint | None = None  # read-ahead state of a large raw file
    generation: int = 0  # the file's distrust count at open: a later distrust fails this handle
    stream: bool = False  # a large zstd file served while it decodes (decode.py)
    decode: Decode | None = None  # the decode this handle reads from, once it has read


def _mismatch(entry: Entry, actual: bytes) -> IntegrityError:
    return IntegrityError(f"{show(entry.path)}: sha256 mismatch: expected {entry.hash.hex()}, got {actual.hex()}")


class Reader(StreamingReads):
    """Serves entry bytes from one archive's data source; see the module docstring."""

    def __init__(
        self,
        source: RangeSource,
        store: ContentStore,
        config: ReaderConfig | None = None,
        on_poison: Callable[[Entry], None] | None = None,
        dir_span: Callable[[bytes], tuple[int, int] | None] | None = None,
        recorder: Callable[[Entry, int, int], None] | None = None,
    ) -> None:
        """`dir_span(path)` gives the data-blob range of a directory's files (contiguous: the
        blob is in path order), for prefetching small files read one after another. `recorder`
        is told of every read that reaches the daemon (--record-profile: profile.Recorder.read)."""
        self.recorder = recorder
        self.source = source
        self.store = store
        self.config = config or ReaderConfig()
        self.on_poison = on_poison
        self.dir_span = dir_span
        self.remote = source if isinstance(source, Fetching) else None
        self._nursery: trio.Nursery | None = None
        self._dir_hints: OrderedDict[bytes, ReadHint | None] = OrderedDict()
        self._verified: set[int] = set()
        self._poisoned: set[int] = set()
        self._unservable: set[int] = set()  # files beyond every size limit, logged once (Unservable)
        self._progress: dict[int, _Progress] = {}
        self._kept: OrderedDict[int, Entry] = OrderedDict()  # progress of files with no handle (LRU)
        self._generation: dict[int, int] = {}  # entry -> distrusts so far (see _distrust)
        self._suspect: set[int] = set()  # purged and read whole from the origin before served again
        self._completing = trio.CapacityLimiter(1)  # hashes of files read in part and closed
        self._completions = 0  # started or waiting
        self._verifying: dict[int, trio.Event] = {}
        self._decoded: LRU[bytes, bytes] = LRU(MEMORY_BUDGET_BYTES, len)  # sha256 -> content
        self._decodes = {}  # large zstd files served while they decode (streaming.py)
        self._pending = {}
        self._starting = {}

    def attach(self, nursery: trio.Nursery) -> None:
        """The long-lived nursery for background verification (``verify="background"``)."""
        self._nursery = nursery

    def state(self, entry: Entry) -> str:
        """'verified', 'poisoned' or 'unverified' (exposed as the user.blobmount.verified xattr)."""
        if entry.number in self._poisoned:
            return "poisoned"
        return "verified" if entry.number in self._verified else "unverified"

    # -- handles -------------------------------------------------------------------------------

    async def open(self, entry: Entry) -> Handle:
        self._check_poison(entry)
        handle = Handle(entry)
        if 0 < entry.original_size <= SMALL_DECODE_BYTES:
            # Loaded (and verified) on the first read, not here: an open whose pages the kernel
            # already holds never reads, and loading at open made a warm read-all of a small-file
            # tree 2.7x slower (bench/fs_local.py).
            handle.small = True
        elif entry.compression == COMPRESSION_ZSTD and entry.original_size and self._progressive(entry):
            await self._open_stream(handle)
        elif entry.compression == COMPRESSION_ZSTD and entry.original_size:
            try:
                handle.content_fd = await self._open_decoded(entry)
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
                handle.content = await self._decode_small(entry)
        elif entry.original_size:
            start, end = entry.data_offset, entry.data_offset + entry.original_size
            handle.hint = ReadHint(start, end)
            if (
                self.remote is not None
                and entry.number not in self._verified
                and entry.number not in self._suspect
                and await self.remote.was_verified(start, end, entry.hash)
            ):
                self._verified.add(entry.number)
            if not self._upfront(entry):
                handle.generation = self._generation.get(entry.number, 0)
                progress = self._progress.setdefault(entry.number, _Progress())
                self._kept.pop(entry.number, None)
                progress.users += 1
                if (
                    self.config.verify == "background"
                    and entry.number not in self._verified
                    and entry.number not in self._verifying
                    and self._nursery is not None
                ):
                    self._nursery.start_soon(self._verify_in_background, entry)
        return handle

    def close(self, handle: Handle) -> None:
        entry = handle.entry
        if handle.decode is not None:
            self._leave(handle)
        if handle.content_fd is not None:
            self.store.release(entry.hash.hex(), handle.content_fd)
            handle.content_fd = None
        elif not handle.small and entry.original_size and not self._upfront(entry):
            progress = self._progress.get(entry.number)
            if progress is not None:
                progress.users -= 1
                if progress.users <= 0:
                    self._last_close(entry, progress)

    def _last_close(self, entry: Entry, progress: _Progress) -> None:
        """Keep the hash state of a file that was served in part (the kernel keeps those pages
        for the next open); forget it when nothing is left to check."""
        served = progress.hashed_upto or progress.covered or progress.early
        if entry.number in self._verified or entry.number in self._poisoned or not served:
            del self._progress[entry.number]
            return
        for offset, data in progress.early.items():  # no bytes kept for a file nobody reads
            progress.covered = _merge(progress.covered, (offset, offset + len(data)))
        progress.early.clear()
        progress.early_bytes = 0
        self._kept[entry.number] = entry
        rest = entry.original_size - progress.hashed_upto
        if rest <= COMPLETE_BYTES and self._nursery is not None and not progress.finishing:
            self._nursery.start_soon(self._complete, entry, progress)
        while len(self._kept) > KEPT_PROGRESS:
            number, old = self._kept.popitem(last=False)
            del self._progress[number]
            self._notify_poison(old)  # its served pages go too: a later read starts at byte 0

    def verifies_lazily(self, entry: Entry) -> bool:
        """Whether bytes of this file may be served before all of it was verified (a raw file read
        lazily, a zstd file served while it decodes): its guarantees need per-open state (the
        distrust count of each open, :meth:`_check_generation`), so the filesystem keeps real
        opens for an archive that holds such a file (fs.py)."""
        return self.config.verify != "strict" and entry.original_size > self.config.verify_threshold

    def lazy_above(self) -> int | None:
        """The size above which files are verified lazily (:meth:`verifies_lazily`); None: none is."""
        return None if self.config.verify == "strict" else self.config.verify_threshold

    def _upfront(self, entry: Entry) -> bool:
        """Whether this raw file is verified whole before its first byte is served."""
        return self.config.verify == "strict" or entry.original_size <= self.config.verify_threshold

    def _check_poison(self, entry: Entry) -> None:
        if entry.number in self._poisoned:
            raise IntegrityError(f"{show(entry.path)}: failed verification earlier; not served")

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        entry = handle.entry
        self._check_poison(entry)
        end = min(offset + size, entry.original_size)
        if offset >= end:
            return b""
        if self.recorder is not None:
            self.recorder(entry, offset, end)
        while handle.small and handle.content is None:  # single-flight per handle
            if handle.loading is not None:  # the kernel's read-ahead sends reads in parallel
                await handle.loading.wait()
                self._check_poison(entry)
                continue
            loading = handle.loading = trio.Event()
            try:
                hint = self._dir_hint(entry)
                if entry.compression == COMPRESSION_ZSTD:
                    handle.content = await self._decode_small(entry, hint)
                else:
                    handle.content = await self._load_small_raw(entry, hint)
            finally:
                handle.loading = None
                loading.set()
        if handle.content is not None:
            return handle.content[offset:end]
        if handle.stream:
            return await self._read_stream(handle, offset, end)
        if handle.content_fd is not None:
            fd = handle.content_fd
            if end - offset <= BLOCK_BYTES:
                return os.pread(fd, end - offset, offset)
            return await trio.to_thread.run_sync(os.pread, fd, end - offset, offset)
        if entry.original_size == 0:
            return b""
        upfront = self._upfront(entry)
        if not upfront:
            self._check_generation(handle)
        if entry.number not in self._verified and (upfront or entry.number in self._suspect):
            await self._verify_whole(entry)
        data = await self.source.read_range(entry.data_offset + offset, entry.data_offset + end, handle.hint)
        if not upfront:
            self._check_generation(handle)  # distrusted while this read waited: not served
            if entry.number not in self._verified:
                progress = self._progress.get(entry.number)
                if progress is not None:
                    await self._advance(entry, progress, offset, data)
        return data

    async def _complete(self, entry: Entry, progress: _Progress) -> None:
        """A file served in part and closed: if the rest is at hand (in the chunk cache, or a
        local blob) and small (``COMPLETE_BYTES``), hash it now, so the file is verified (or
        distrusted, its pages dropped) without waiting for another reader. Not started when the
        rest would have to be fetched: only the bytes read cross the network."""
        if self._completions >= COMPLETE_QUEUE:
            return  # many files closed at once: the rest stay kept, hashed as they are read
        self._completions += 1
        try:
            async with self._completing:  # one at a time: bounded disk and CPU
                start, end = entry.data_offset + progress.hashed_upto, entry.data_offset + entry.original_size
                if self._progress.get(entry.number) is not progress or progress.users or progress.finishing:
                    return  # reopened, distrusted or finishing meanwhile: the reads take it from here
                if self.remote is not None and self.remote.cached_bytes(start, end) < end - start:
                    return
                progress.covered = _merge(progress.covered, (progress.hashed_upto, entry.original_size))
                await self._finish(entry, progress, "it was read in part and closed")
        except BlobmountError as exc:  # a mismatch is logged (and handled) by _finish
            if not isinstance(exc, IntegrityError):
                log.debug("%s: completing its hash stopped: %s (it resumes as the file is read)", show(entry.path), exc)
        finally:
            self._completions -= 1

    def _check_generation(self, handle: Handle) -> None:
        """A handle opened before the file was distrusted may have been given wrong bytes (or the
        kernel may have, from pages it held): its reads fail from then on, so the program sees
        an error; a new open reads the verified bytes."""
        if handle.generation != self._generation.get(handle.entry.number, 0):
            raise IntegrityError(
                f"{show(handle.entry.path)}: failed verification while this open was reading it; open it again"
            )

    # -- verification --------------------------------------------------------------------------

    async def _hash_range(self, entry: Entry, start: int, hasher: hashlib._Hash) -> None:
        pos = start
        hint = ReadHint(entry.data_offset, entry.data_offset + entry.original_size)
        while pos < entry.original_size:
            end = min(pos + BLOCK_BYTES, entry.original_size)
            block = await self.source.read_range(entry.data_offset + pos, entry.data_offset + end, hint)
            hasher.update(block)
            pos = end

    async def _forget_remote(self, entry: Entry) -> None:
        """Before reading a mismatching file again: drop its chunks, refetch from the origin."""
        if self.remote is not None:
            await self.remote.purge(entry.data_offset, entry.data_offset + entry.data_size)

    async def _remember(self, entry: Entry) -> None:
        if self.remote is not None and entry.original_size > SMALL_DECODE_BYTES:
            await self.remote.remember_verified(entry.data_offset, entry.data_offset + entry.original_size, entry.hash)

    async def _verify_in_background(self, entry: Entry) -> None:
        """``verify="background"``: the rest of an opened large file is read and hashed now."""
        await self._verify_detached(entry, "background verification stopped", "it resumes as the file is read")

    async def _verify_detached(self, entry: Entry, stopped: str, then: str) -> None:
        """:meth:`_verify_whole` as a task of its own: a mismatch was logged once by _poison (the
        file is EIO from now on); any other failure is one warning, and a later read tries again."""
        try:
            await self._verify_whole(entry)
        except IntegrityError:
            pass
        except BlobmountError as exc:
            log.warning("%s: %s: %s (%s)", show(entry.path), stopped, exc, then)

    async def _verify_whole(self, entry: Entry) -> None:
        """Hash the whole file before serving it; single-flight per entry. A mismatch is read once
        more (a transient fault must not poison a file) before the file is poisoned; a suspect
        file (distrusted) is purged and read from the origin, and a mismatch then poisons it."""
        number = entry.number
        while (pending := self._verifying.get(number)) is not None:
            await pending.wait()
            self._check_poison(entry)
            if number in self._verified:
                return
        done = self._verifying[number] = trio.Event()
        try:
            for _ in range(2):
                suspect = number in self._suspect
                if suspect:
                    await self._forget_remote(entry)  # its chunks, from the origin next
                hasher = hashlib.sha256()
                await self._hash_range(entry, 0, hasher)
                if hasher.digest() == entry.hash:
                    if number in self._suspect and not suspect:
                        continue  # distrusted while this read the old chunks: once more, purged
                    self._suspect.discard(number)
                    self._hashed_ok(entry)
                    await self._remember(entry)
                    return
                if suspect:
                    break
                _MISMATCH.inc()
                log.warning("%s: sha256 mismatch; reading it again from the origin", show(entry.path))
                if self._upfront(entry):
                    self._suspect.add(number)  # nothing of it was served
                else:
                    self._distrust(entry, reverify=False)  # served as read meanwhile (background)
            self._poison(entry, hasher.digest())
        finally:
            del self._verifying[number]
            done.set()

    def _distrust(self, entry: Entry, *, reverify: bool = True) -> None:
        """Bytes of this file served so far may be wrong: fail every handle opened until now
        (:meth:`_check_generation`), drop the kernel's pages, start the hash over, and purge and
        read the file whole from the origin before another byte of it is served (``reverify``:
        now, in the background, so the next open finds it done; else by the next read)."""
        number = entry.number
        self._generation[number] = self._generation.get(number, 0) + 1
        self._verified.discard(number)
        self._suspect.add(number)
        old = self._progress.get(number)
        if old is not None:
            self._progress[number] = _Progress(users=old.users)
        self._notify_poison(entry)
        if reverify and self._nursery is not None:
            self._nursery.start_soon(self._reverify, entry)

    async def _reverify(self, entry: Entry) -> None:
        await self._verify_detached(entry, "reading it again from the origin stopped", "the next read tries again")

    async def _advance(self, entry: Entry, progress: _Progress, offset: int, data: bytes) -> None:
        if progress.finishing:
            return
        end = offset + len(data)
        if offset <= progress.hashed_upto < end:
            progress.hasher.update(memoryview(data)[progress.hashed_upto - offset :])
            progress.hashed_upto = end
            self._drain_early(progress)
        elif end > progress.hashed_upto:
            # Concurrent FUSE reads finish out of order by a few MiB: keep such reads (bounded)
            # until the gap before them is hashed, instead of reading them again at the end.
            if progress.early_bytes + len(data) <= EARLY_BYTES and offset not in progress.early:
                progress.early[offset] = data
                progress.early_bytes += len(data)
            else:
                progress.covered = _merge(progress.covered, (offset, end))
        # Once every byte has been read, bytes that arrived out of order and were not kept are
        # read again to hash them in order (rare with the buffer above).
        if progress.hashed_upto < entry.original_size and not _covers(
            progress.covered, progress.hashed_upto, entry.original_size
        ):
            return
        await self._finish(entry, progress, "the read fails (EIO)")

    async def _finish(self, entry: Entry, progress: _Progress, outcome: str) -> None:
        """Every byte was served: hash what was not hashed in order (from the source) and decide.
        A mismatch distrusts the file and raises (`outcome` says what the log line promises)."""
        progress.finishing = True
        if progress.hashed_upto < entry.original_size:
            try:
                await self._hash_range(entry, progress.hashed_upto, progress.hasher)
            except BaseException:
                # the hasher may hold part of the catch-up: start over, hashing all at the end
                progress.hasher, progress.hashed_upto = hashlib.sha256(), 0
                progress.covered, progress.finishing = [(0, entry.original_size)], False
                progress.early.clear()
                progress.early_bytes = 0
                raise
            progress.hashed_upto = entry.original_size
        digest = progress.hasher.digest()
        if digest == entry.hash:
            self._hashed_ok(entry)
            await self._remember(entry)
            return
        # Bytes already served were wrong: this read fails, and so does every handle that may hold
        # them. One more read from the origin decides between a transient fault and a bad archive.
        _MISMATCH.inc()
        log.warning(
            "%s: sha256 mismatch after reading it all (got %s): %s; reading it again from the origin",
            show(entry.path),
            digest.hex(),
            outcome,
        )
        self._distrust(entry)
        raise IntegrityError(f"{show(entry.path)}: sha256 mismatch after reading it all; not served")

    @staticmethod
    def _drain_early(progress: _Progress) -> None:
        """Hash the kept early reads that now continue the hashed prefix; drop the stale ones."""
        while progress.early:
            upto = progress.hashed_upto
            nxt = min(progress.early)
            if nxt > upto:
                return
            data = progress.early.pop(nxt)
            progress.early_bytes -= len(data)
            if nxt + len(data) > upto:
                progress.hasher.update(memoryview(data)[upto - nxt :])
                progress.hashed_upto = nxt + len(data)

    def _hashed_ok(self, entry: Entry) -> None:
        self._verified.add(entry.number)
        _OK.inc()

    def _poison(self, entry: Entry, actual: bytes) -> None:
        metrics.VERIFY_FILES.labels(result="poisoned").inc()
        metrics.VERIFY_FAILURES.labels(what="file").inc()
        self._poisoned.add(entry.number)
        self._suspect.discard(entry.number)
        err = _mismatch(entry, actual)
        log.error("%s", err)
        self._notify_poison(entry)
        raise err

    def _notify_poison(self, entry: Entry) -> None:
        if self.on_poison is not None:
            self.on_poison(entry)

    # -- zstd ----------------------------------------------------------------------------------

    async def _open_decoded(self, entry: Entry) -> int:
        key = entry.hash.hex()
        for attempt in range(3):  # open, fill (once more after a mismatch), open
            fd = await self.store.open(key)
            if fd is not None:
                return fd
            try:
                await self.store.fill(key, entry.original_size, lambda tmp: self._decode(entry, tmp))
            except (IntegrityError, InvalidArchive) as exc:
                await self._decode_failed(entry, exc, attempt)
                continue
            self._hashed_ok(entry)
        raise SourceError(f"{show(entry.path)}: decoded content vanished from the cache twice")

    async def _decode_failed(self, entry: Entry, exc: IntegrityError | InvalidArchive, attempt: int) -> None:
        """A zstd file whose frame or sha256 did not check out. From a remote source the first
        time: a fault on the way or the archive? Its chunks are dropped and it is read once more
        (from the origin); otherwise it is poisoned for this mount and `exc` raised."""
        if attempt == 0 and self.remote is not None:
            _MISMATCH.inc()
            log.warning("%s; reading it again", exc)
            await self._forget_remote(entry)
            return
        self._poisoned.add(entry.number)
        metrics.VERIFY_FILES.labels(result="poisoned").inc()
        log.error("%s", exc)
        raise exc

    def _memory_get(self, digest: bytes) -> bytes | None:
        return self._decoded.get(digest)

    def _memory_put(self, digest: bytes, data: bytes) -> None:
        self._decoded.put(digest, data)

    def _dir_hint(self, entry: Entry) -> ReadHint | None:
        """The read-ahead state of the directory a small file sits in (remote sources only): the
        files of a directory are neighbours in the data blob, and programs read them in a row."""
        if self.remote is None or self.dir_span is None:
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

    async def _decode_small(self, entry: Entry, hint: ReadHint | None = None) -> bytes:
        """A small zstd file decoded and verified in memory, kept in a bounded LRU by sha256.
        A remote file's compressed bytes are fetched first, on this thread: the decoder's thread
        then never waits for the network. Files whose frame is at most ``INLINE_DECODE_BYTES``
        are read and decoded right here: a thread hop costs more than decoding them."""
        cached = self._memory_get(entry.hash)
        if cached is not None:
            self._verified.add(entry.number)
            return cached
        inline = entry.data_size <= INLINE_DECODE_BYTES
        for attempt in range(2):
            sink = io.BytesIO()
            compressed = None
            if inline or (self.remote is not None and entry.data_size <= SPILL_DECODE_BYTES):
                compressed = await self.source.read_range(entry.data_offset, entry.data_offset + entry.data_size, hint)
            try:
                if inline:
                    self._decode_to(entry, sink, compressed)
                else:
                    await trio.to_thread.run_sync(self._decode_to, entry, sink, compressed)
                break
            except (IntegrityError, InvalidArchive) as exc:
                await self._decode_failed(entry, exc, attempt)
        data = sink.getvalue()
        self._hashed_ok(entry)
        self._memory_put(entry.hash, data)
        return data

    async def _load_small_raw(self, entry: Entry, hint: ReadHint | None = None) -> bytes:
        """A small raw file fetched whole once, verified, and served from memory: one request for
        a remote source instead of a verification pass plus the reads, no repeated preads locally.
        A mismatch is read once more before the file is poisoned (a fault must not poison it)."""
        cached = self._memory_get(entry.hash)
        if cached is not None:
            self._verified.add(entry.number)
            return cached
        for attempt in range(2):
            data = await self.source.read_range(entry.data_offset, entry.data_offset + entry.original_size, hint)
            actual = hashlib.sha256(data).digest()
            if actual == entry.hash:
                self._hashed_ok(entry)
                self._memory_put(entry.hash, data)
                return data
            if attempt == 0:
                _MISMATCH.inc()
                log.warning("%s: sha256 mismatch; reading it again", show(entry.path))
                await self._forget_remote(entry)
        self._poison(entry, actual)
        raise AssertionError("unreachable: _poison raises")  # pragma: no cover

    def _decode(self, entry: Entry, tmp: Path) -> None:
        """Worker thread: decode the entry's frame into the file `tmp`."""
        with open(tmp, "r+b") as out:  # pre-sized by the content store
            self._decode_to(entry, out, keep=False)  # the store keeps it: its frame need not be

    def _decode_to(self, entry: Entry, out: BinaryIO, compressed: bytes | None = None, keep: bool = True) -> None:
        """Worker thread: decode the entry's frame (`compressed`, or read from the source as the
        decoder goes) into `out`, verifying size and sha256. `keep=False`: the frame's chunks are
        not written to the chunk cache (RangeStream)."""
        stream: io.RawIOBase | io.BytesIO
        if compressed is not None:
            stream = io.BytesIO(compressed)
        else:
            stream = RangeStream(self.source, entry.data_offset, entry.data_offset + entry.data_size, keep=keep)
        dctx = zstandard.ZstdDecompressor()
        hasher = hashlib.sha256()
        total = 0
        try:
            source = dctx.stream_reader(stream, read_size=BLOCK_BYTES)  # type: ignore[arg-type]
            with source as reader:
                while True:
                    block = reader.read(BLOCK_BYTES)
                    if not block:
                        break
                    total += len(block)
                    if total > entry.original_size:
                        raise IntegrityError(
                            f"{show(entry.path)}: zstd frame decodes past original_size {entry.original_size}; refused"
                        )
                    hasher.update(block)
                    out.write(block)
        except zstandard.ZstdError as exc:
            raise IntegrityError(
                f"{show(entry.path)}: corrupt zstd frame (expected sha256 {entry.hash.hex()}): {exc}"
            ) from exc
        if total != entry.original_size:
            raise IntegrityError(
                f"{show(entry.path)}: zstd frame decodes to {total} bytes, original_size is {entry.original_size}"
            )
        if hasher.digest() != entry.hash:
            raise _mismatch(entry, hasher.digest())

    # -- whole files (cat) ---------------------------------------------------------------------

    async def stream_verified(self, entry: Entry) -> AsyncIterator[bytes]:
        """Every byte of `entry`, yielded only once the whole file has been verified: nothing of a
        bad file is ever produced. Memory stays at one block."""
        if entry.original_size == 0:
            if entry.hash != EMPTY_SHA256:
                raise _mismatch(entry, EMPTY_SHA256)
            return
        handle = await self.open(entry)
        try:
            if handle.stream and entry.number not in self._verified:
                await self._recheck(entry, False)  # nothing before the verdict
                self._check_poison(entry)
            elif handle.content_fd is None and not handle.small and not handle.stream:
                await self._verify_whole(entry)
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
                raise _mismatch(entry, check.digest())
        finally:
            self.close(handle)


def _merge(ranges: list[tuple[int, int]], new: tuple[int, int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    start, end = new
    placed = False
    for a, b in ranges:
        if b < start:
            out.append((a, b))
        elif a > end:
            if not placed:
                out.append((start, end))
                placed = True
            out.append((a, b))
        else:
            start, end = min(a, start), max(b, end)
    if not placed:
        out.append((start, end))
    return out


def _covers(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(a <= start and b >= end for a, b in ranges)
