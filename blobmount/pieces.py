"""Sub-chunk fetches for random reads: a 4 KiB read at a random offset costs a 32 KiB piece (two
where it straddles their boundary), not a 1 MiB chunk.

Chunks (1 MiB) are right for whole trees and streams: few requests, read-ahead on top. For a reader
that jumps around a large file (a database, an index, ``pread`` of a model's tensors), every read
that misses pulls a whole chunk: 256x the bytes a 4 KiB read needs, and the transfer time of 1 MiB
per read on a slow link. The fetcher (fetch.py) sends such reads here instead, when all of these
hold: the read belongs to one open file (not a directory of small files, not a zstd frame), it
does not continue the previous read of that file (nor start a file at its first byte: a first read
at the start is how sequential readers and whole-file reads begin), it is short (at most
``MAX_READ_BYTES``), and no chunk under it is present, on its way, or bound to a verified record or
to the origin (those stay on the chunk path, whose checks they need). A read that then continues
in order is back on the chunk path, with its read-ahead.

Pieces are chunks of another size: a second :class:`~blobmount.cache.ChunkStore` over the same
data blob with ``PIECE_BYTES`` as its chunk size, in its own directory
(``chunks/<digest hex>-32768/``), same file format (bytes, xxh3 trailer, magic), same crash safety,
same budget and pruning. A cache directory holds a chunk or a piece only ever whole, each under a
name that says its size, so no release, older or newer, can take one for the other or a part for
the whole. The chunk path never reads pieces: the pieces under a chunk fetched later are left to
the pruner (at most a chunk's worth of duplicates per chunk, and only where a reader jumped).

Within one process a piece is fetched once at a time (one flight per piece); two processes on one
cache directory may fetch the same piece (32 KiB; chunks carry the cross-process claims). A piece
whose disk write has not landed is held apart from the memory tier (``UNSAVED_PIECES`` at most:
a read that would pass them waits for the writes) until it has: evicted from the small memory tier
before its write landed, it would be fetched a second time, and the integrity check below, finding
it nowhere, would call a file that reads right a mismatch.

Integrity: a random read of a lazily verified file is served before the file is verified, from a
piece as from a chunk (README, Integrity). Verification hashes the chunks, so a piece is one more
copy of those bytes, fetched apart, which the kernel may keep in its page cache and serve to a
later read of the whole file. Hence: a file's hash counts as a match only when every piece served
under it since the mount (a bit per piece) still holds the bytes its chunks hold there
(:meth:`ChunkedSource.pieces_agree`); a piece that differs, or is gone and cannot be compared,
makes it a mismatch, with all that follows (EIO, pages dropped, everything purged, the file read
again from the origin). After a match the file's pieces are deleted: the chunks hold the verified
bytes, and a piece must not keep serving others at that offset.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

import trio

from blobmount.cache import CacheDir, ChunkStore
from blobmount.daemon import metrics
from blobmount.errors import BlobmountError, SourceError, TransientError
from blobmount.flight import Flights
from blobmount.readahead import ReadHint
from blobmount.registry.retry import Retry

log = logging.getLogger(__name__)

PIECE_BYTES = 32 << 10  # a 4 KiB read fetches 8x its bytes, 9x on average: a file starts anywhere in
# the data blob, so 1 read in 8 straddles two pieces. On loopback a 32 KiB GET costs about what a
# 4 KiB one does; through 10 ms of RTT both are one round trip.
MAX_READ_BYTES = 4 * PIECE_BYTES  # longer reads go to chunks: they are likely a stream's first
MEMORY_BYTES = 4 << 20  # hot pieces per mount (a reader re-reading what it just read)
UNSAVED_PIECES = 256  # pieces fetched whose disk write has not landed (8 MiB): a stalled disk stops
# random reads here, each within its --timeout, rather than filling memory


class Pieces:
    """The pieces of one remote data blob (module docstring)."""

    def __init__(
        self,
        cache: CacheDir | None,
        blob_hex: str,
        blob_size: int,
        fetch: Callable[[int, int], AsyncGenerator[bytes, None]],
        *,
        retry: Retry,
        timeout_s: float,
        on_fetched: Callable[[int], None],
    ) -> None:
        """`fetch(start, end)` streams the range's blocks (the fetcher's remote source, mirrors
        allowed: pieces never serve chunks bound to the origin); `on_fetched(n)` counts the bytes."""
        self.store = ChunkStore(cache, blob_hex, blob_size, PIECE_BYTES, MEMORY_BYTES)
        self._fetch = fetch
        self._retry = retry
        self.timeout_s = timeout_s
        self._on_fetched = on_fetched
        self._flights: Flights[int] = Flights()
        self._nursery: trio.Nursery | None = None
        self._served = bytearray((self.store.count + 7) // 8)  # a bit per piece served since the mount
        self._unsaved: dict[int, bytes] = {}  # fetched, disk write under way (module docstring)
        self._room = trio.Semaphore(UNSAVED_PIECES)  # a token per entry of _unsaved
        self._unwanted: set[int] = set()  # purged while their write was under way: deleted once it lands
        self.requests = 0

    def attach(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    @staticmethod
    def wanted(hint: ReadHint | None, start: int, end: int) -> bool:
        """Whether a read looks random (the access-pattern half of the rule; the fetcher checks
        the chunks). Within ``MAX_READ_BYTES`` of the previous read's end counts as in order: the
        kernel's reads of a stream arrive at most that much out of order, and longer ones never
        come here."""
        if hint is None or hint.directory or not hint.keep or end - start > MAX_READ_BYTES:
            return False
        if hint.pos < 0:
            return start > hint.lo  # a first read: at the file's start it begins a stream
        return not hint.pos - MAX_READ_BYTES <= start <= hint.pos + MAX_READ_BYTES

    async def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) through pieces: from memory, disk, or one request per run of missing
        pieces. Bounded by --timeout like a chunk read."""
        ps = PIECE_BYTES
        first, last = start // ps, (end - 1) // ps
        with trio.move_on_after(self.timeout_s):
            parts = [await self._piece(i, last) for i in range(first, last + 1)]
            for i in range(first, last + 1):
                self._served[i >> 3] |= 1 << (i & 7)
            joined = parts[0] if len(parts) == 1 else b"".join(parts)
            lo = start - first * ps
            return joined[lo : lo + end - start]
        raise TransientError(
            f"bytes {start}-{end} of the data blob did not arrive within --timeout {self.timeout_s:g} s"
        )

    def served(self, start: int, end: int) -> list[int]:
        """The pieces under [start, end) served since the mount (their bytes may be in the
        kernel's page cache), in order."""
        ps = PIECE_BYTES
        first, last = start // ps, (end - 1) // ps
        out = []
        for byte in range(first >> 3, (last >> 3) + 1):
            bits = self._served[byte]
            if bits:
                out += [i for i in range(byte << 3, (byte << 3) + 8) if first <= i <= last and bits >> (i & 7) & 1]
        return out

    async def get(self, index: int) -> bytes | None:
        """A piece from memory or disk; None when it is gone (pruned, or never written)."""
        data = self.store.memory_get(index)
        if data is None:
            data = self._unsaved.get(index)
        if data is None:
            data = await trio.to_thread.run_sync(self.store.load, index)
        return data

    def purge(self, start: int, end: int) -> None:
        """Forget the pieces under [start, end) in memory and that they were served (the disk:
        :meth:`purge_disk`)."""
        ps = PIECE_BYTES
        for index in range(start // ps, (end - 1) // ps + 1):
            self.store.forget(index)
            self._served[index >> 3] &= ~(1 << (index & 7)) & 0xFF
            if self._unsaved.pop(index, None) is not None:
                self._unwanted.add(index)  # its write is under way: undone once it lands (_persist)

    def purge_disk(self, start: int, end: int) -> None:
        """Worker thread: delete the pieces under [start, end) from disk. One listing of the
        pieces directory rather than a stat per piece: a 1 GiB file spans 32,768 pieces, of
        which a random reader leaves a few hundred."""
        ps = PIECE_BYTES
        first, last = start // ps, (end - 1) // ps
        if last - first < 64:
            self.store.purge_disk(first, last)
            return
        directory = self.store.directory
        if directory is None:
            return
        try:
            names = [e.name for e in os.scandir(directory)]
        except OSError:
            return
        for name in names:
            if name.isdigit() and first <= int(name) <= last:
                self.store.purge_disk(int(name), int(name))

    async def _piece(self, index: int, last: int) -> bytes:
        for _ in range(4):  # bounded: a flight that ended without bytes (cancelled) is led afresh
            data = self.store.memory_get(index)
            if data is None:
                data = self._unsaved.get(index)
            if data is not None:
                return data
            if self._flights.busy(index):
                await self._flights.wait(index)
                continue
            with self._flights.lead(index):
                # one stat here rather than a thread hop for the load: most pieces are absent
                data = await trio.to_thread.run_sync(self.store.load, index) if self.store.on_disk(index) else None
                if data is None:
                    data = await self._fetch_run(index, last)
                self.store.memory_put(index, data)
                return data
        raise SourceError(f"piece {index} of the data blob kept disappearing")

    async def _fetch_run(self, index: int, last: int) -> bytes:
        """Fetch piece `index` and the missing pieces after it up to `last` (the same read) in one
        request; the others are landed in memory and on disk, `index`'s bytes returned."""
        end_index = index
        while (
            end_index < last
            and self.store.memory_get(end_index + 1) is None
            and end_index + 1 not in self._unsaved
            and not self._flights.busy(end_index + 1)
            and not self.store.on_disk(end_index + 1)
        ):
            end_index += 1
        start, end = self.store.span(index)[0], self.store.span(end_index)[1]
        body = b""
        for attempt in itertools.count(1):  # bounded by the one retry policy (MAX_ATTEMPTS)
            try:
                body = await self._request(start, end)
                break
            except BlobmountError as exc:
                if not self._retry.should_retry(attempt, exc):
                    raise
                await self._retry.pause(attempt, exc, f"data blob bytes {start}-{end}: ")
        nursery = self._nursery if self.store.cache is not None else None
        if nursery is not None:
            await self._reserve(end_index - index + 1)
        for i in range(index, end_index + 1):  # no await from here on: all of the run, or none
            lo, hi = self.store.span(i)
            data = body[lo - start : hi - start]
            self.store.memory_put(i, data)
            if nursery is not None:
                self._unwanted.discard(i)
                self._unsaved[i] = data
                nursery.start_soon(self._persist, i, data)
        return body[: self.store.length(index)]

    async def _reserve(self, count: int) -> None:
        """`count` places in the unsaved table, or none (cancelled: the read's --timeout)."""
        got = 0
        try:
            while got < count:
                await self._room.acquire()
                got += 1
        except BaseException:
            for _ in range(got):
                self._room.release()
            raise

    async def _request(self, start: int, end: int) -> bytes:
        self.requests += 1
        metrics.FETCH_REQUESTS.inc()
        metrics.FETCH_IN_FLIGHT.inc()
        try:
            async with aclosing(self._fetch(start, end)) as blocks:
                body = b"".join([block async for block in blocks])
        finally:
            metrics.FETCH_IN_FLIGHT.dec()
        if len(body) != end - start:
            raise TransientError(f"a range of {end - start} bytes answered {len(body)}")
        self._on_fetched(len(body))
        return body

    async def _persist(self, index: int, data: bytes) -> None:
        """Write one piece (a worker thread), then let it go from the unsaved table. A write that
        failed (a full disk) leaves it to the memory tier alone, as before the table: gone from
        both, it cannot be compared, which the integrity rule takes for a mismatch."""
        try:
            await trio.to_thread.run_sync(self.store.store, index, data)
            if index in self._unwanted:  # purged while it was being written: not to outlive that
                self._unwanted.discard(index)
                await trio.to_thread.run_sync(self.store.purge_disk, index, index)
        except Exception:  # the piece stays in memory; a bug here must not end the mount
            log.exception("chunk cache: storing piece %d failed unexpectedly", index)
        finally:
            if self._unsaved.get(index) is data:
                del self._unsaved[index]
            self._room.release()
