"""Lazy verification of large raw files: hashed as the reads arrive, per file, not per open.

A raw file larger than ``verify_threshold`` (not under ``strict``) is served as read and hashed in
order as the reads arrive; reads ahead of the hashed prefix are kept (``EARLY_BYTES``) until the gap
before them is hashed, and bytes that arrived out of order and were not kept are read again once
every byte was served. The hash state is per file, not per open: it outlives the handles
(``KEPT_PROGRESS`` files), because with ``keep_cache`` the kernel serves pages an earlier open was
given without asking again, so a file read in pieces by several opens or processes is still
verified once all of it was served; a state given up drops the file's pages with it (a later read
is then hashed from byte 0). A file served in part and closed is hashed to its end from the cache
when little is left (``COMPLETE_BYTES``; never a fetch).

A mismatch is a distrust (integrity/__init__.py): the read that completes the file fails. Deciding
awaits (it may hash the rest from the source); a read of the file served meanwhile, by any open,
waits for the verdict and fails with it: unaccounted, it could end a whole read with wrong bytes.

Concurrency: touched only from the trio thread.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from blobmount.daemon import metrics
from blobmount.errors import BlobmountError, IntegrityError
from blobmount.index import Entry
from blobmount.index.paths import show
from blobmount.integrity.whole import BLOCK_BYTES, hash_range

if TYPE_CHECKING:
    from blobmount.integrity import Integrity

log = logging.getLogger("blobmount.reader")
_MISMATCH = metrics.VERIFY_FILES.labels(result="mismatch")

EARLY_BYTES = 16 << 20  # per file being verified lazily: out-of-order reads kept until hashable
KEPT_PROGRESS = 256  # lazily served files whose hash state outlives their last handle (LRU)
COMPLETE_BYTES = 64 << 20  # a file served in part and closed is hashed to its end, from the cache,
# when at most this much of it is left (bounded background work; never a fetch)
COMPLETE_QUEUE = 16  # such completions waiting at most (one runs at a time); more are not started


@dataclass(slots=True)
class Progress:
    """Lazy verification state of one raw file: what of it was served, and hashed so far."""

    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    hashed_upto: int = 0
    covered: list[tuple[int, int]] = field(default_factory=list)  # merged ranges beyond hashed_upto
    early: dict[int, bytes] = field(default_factory=dict)  # reads that arrived ahead of hashed_upto
    early_bytes: int = 0
    users: int = 0
    finishing: bool = False  # one task owns the final catch-up; the hasher is frozen for others
    settled: trio.Event = field(default_factory=trio.Event)  # set when that task has decided


class LazyHashes:
    """The hash states of one reader's lazily verified raw files (module docstring)."""

    def __init__(self, integrity: Integrity) -> None:
        self.integrity = integrity
        self._progress: dict[int, Progress] = {}
        self._kept: dict[int, Entry] = {}  # progress of files with no handle, oldest first (LRU)
        self._completing = trio.CapacityLimiter(1)  # hashes of files read in part and closed
        self._completions = 0  # started or waiting

    def opened(self, entry: Entry) -> None:
        progress = self._progress.setdefault(entry.number, Progress())
        self._kept.pop(entry.number, None)
        progress.users += 1

    def closed(self, entry: Entry) -> None:
        progress = self._progress.get(entry.number)
        if progress is not None:
            progress.users -= 1
            if progress.users <= 0:
                self._last_close(entry, progress)

    def restart(self, number: int) -> None:
        """The file was distrusted: its hash starts over (its opens stay counted)."""
        old = self._progress.get(number)
        if old is not None:
            self._progress[number] = Progress(users=old.users)

    async def served(self, entry: Entry, offset: int, data: bytes) -> None:
        """`data`, bytes [offset, ...) of the file, is being served: hash it (or keep it for later).

        While the file is being decided (``finishing``: a close's completion hashing the rest, or
        the read that completed it catching up), these bytes are not in the hash being judged:
        the read waits for the verdict instead of going out unaccounted, and fails if the file
        was distrusted meanwhile (a program reading the file to its end in that window would
        otherwise end with wrong bytes and no error). Raises IntegrityError then, as a read
        that completes a file that does not check out does."""
        integrity = self.integrity
        generation = integrity.generation_of(entry)
        while entry.number not in integrity.verified:
            progress = self._progress.get(entry.number)
            if progress is None:
                break
            if not progress.finishing:
                await self._advance(entry, progress, offset, data)
                break
            await progress.settled.wait()  # verified, distrusted, or given up and reset: see again
            if integrity.generation_of(entry) != generation:
                break
        if integrity.generation_of(entry) != generation:
            raise IntegrityError(f"{show(entry.path)}: failed verification while this read was served; not served")

    def _last_close(self, entry: Entry, progress: Progress) -> None:
        """Keep the hash state of a file that was served in part (the kernel keeps those pages
        for the next open); forget it when nothing is left to check."""
        integrity = self.integrity
        served = progress.hashed_upto or progress.covered or progress.early
        if entry.number in integrity.verified or entry.number in integrity.poisoned or not served:
            del self._progress[entry.number]
            return
        for offset, data in progress.early.items():  # no bytes kept for a file nobody reads
            progress.covered = _merge(progress.covered, (offset, offset + len(data)))
        progress.early.clear()
        progress.early_bytes = 0
        self._kept[entry.number] = entry
        rest = entry.original_size - progress.hashed_upto
        if rest <= COMPLETE_BYTES and not progress.finishing:
            integrity.start(self._complete, entry, progress)
        while len(self._kept) > KEPT_PROGRESS:
            number = next(iter(self._kept))
            old = self._kept.pop(number)
            del self._progress[number]
            integrity.drop_pages(old)  # its served pages go too: a later read starts at byte 0

    async def _complete(self, entry: Entry, progress: Progress) -> None:
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
                remote = self.integrity.remote
                if remote is not None and remote.cached_bytes(start, end) < end - start:
                    return
                progress.covered = _merge(progress.covered, (progress.hashed_upto, entry.original_size))
                await self._finish(entry, progress, "it was read in part and closed")
        except BlobmountError as exc:  # a mismatch is logged (and handled) by _finish
            if not isinstance(exc, IntegrityError):
                log.debug("%s: completing its hash stopped: %s (it resumes as the file is read)", show(entry.path), exc)
        finally:
            self._completions -= 1

    async def _advance(self, entry: Entry, progress: Progress, offset: int, data: bytes) -> None:
        if progress.finishing:
            return
        end = offset + len(data)
        if offset <= progress.hashed_upto < end:
            progress.hasher.update(memoryview(data)[progress.hashed_upto - offset :])
            progress.hashed_upto = end
            _drain_early(progress)
        elif end > progress.hashed_upto:
            # Concurrent FUSE reads finish out of order by a few MiB: keep such reads (bounded)
            # until the gap before them is hashed, instead of reading them again at the end.
            if progress.early_bytes + len(data) <= EARLY_BYTES and offset not in progress.early:
                progress.early[offset] = data
                progress.early_bytes += len(data)
            else:
                progress.covered = _merge(progress.covered, (offset, end))
        await self._catch_up(entry, progress)
        if progress.finishing:  # another read or a close's completion took the decision meanwhile
            await progress.settled.wait()  # its verdict covers these bytes too (served checks it)
            return
        # Once every byte has been read, bytes that arrived out of order and were not kept are
        # read again to hash them in order (rare with the buffer above).
        if progress.hashed_upto < entry.original_size and not _covers(
            progress.covered, progress.hashed_upto, entry.original_size
        ):
            return
        await self._finish(entry, progress, "the read fails (EIO)")

    async def _catch_up(self, entry: Entry, progress: Progress) -> None:
        """The in-order hash reached bytes that were served but not kept (an out-of-order read
        past the early buffer, or one an earlier open read before its last close): hash them from
        the source now, then what was kept after them. Left for the end, they kept the reads that
        came after them in the early buffer, unaccounted, so the read that completed the file did
        not know it: the file was only checked when closed, after a program that read it to its
        end had its bytes and exit 0 (the kernel had served it such a range from its page cache)."""
        while not progress.finishing and self._progress.get(entry.number) is progress:
            upto = progress.hashed_upto
            gap = next((b for a, b in progress.covered if a <= upto < b), None)
            if gap is None:
                return
            end = min(gap, upto + BLOCK_BYTES)
            block = await self.integrity.source.read_range(entry.data_offset + upto, entry.data_offset + end)
            if progress.hashed_upto != upto or progress.finishing or self._progress.get(entry.number) is not progress:
                continue  # another read moved the hash on meanwhile (or the state was dropped)
            progress.hasher.update(block)
            progress.hashed_upto = end
            _drain_early(progress)

    async def _finish(self, entry: Entry, progress: Progress, outcome: str) -> None:
        """Every byte was served: hash what was not hashed in order (from the source) and decide.
        A mismatch distrusts the file and raises (`outcome` says what the log line promises).
        Reads of the file served meanwhile wait for ``settled`` (:meth:`served`)."""
        progress.finishing, progress.settled = True, trio.Event()
        try:
            await self._decide(entry, progress, outcome)
        finally:
            progress.settled.set()  # reads served meanwhile waited for this (served)

    async def _decide(self, entry: Entry, progress: Progress, outcome: str) -> None:
        integrity = self.integrity
        try:
            if progress.hashed_upto < entry.original_size:
                await hash_range(integrity.source, entry, progress.hashed_upto, progress.hasher)
                progress.hashed_upto = entry.original_size
            digest = progress.hasher.digest()
            agree = digest == entry.hash and await integrity.pieces_agree(entry)
        except BaseException:
            # No verdict (a source error, a cancelled read): the hasher may hold part of the
            # catch-up, so start over, hashing all of it at the end; and the decision is no longer
            # under way, or every later read of the file would wait for a verdict never given.
            progress.hasher, progress.hashed_upto = hashlib.sha256(), 0
            progress.covered, progress.finishing = [(0, entry.original_size)], False
            progress.early.clear()
            progress.early_bytes = 0
            raise
        if agree:
            integrity.hashed_ok(entry)
            progress.settled.set()  # the reads that waited need not wait for the record's disk writes
            await integrity.remember(entry)
            return
        # Bytes already served were wrong: this read fails, and so does every handle that may hold
        # them. One more read from the origin decides between a transient fault and a bad archive.
        _MISMATCH.inc()
        what = f"sha256 mismatch (got {digest.hex()})" if digest != entry.hash else "a piece served earlier differs"
        log.warning(
            "%s: %s after reading it all: %s; reading it again from the origin", show(entry.path), what, outcome
        )
        integrity.distrust(entry)
        integrity.reverify(entry)
        raise IntegrityError(f"{show(entry.path)}: sha256 mismatch after reading it all; not served")


def _drain_early(progress: Progress) -> None:
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
