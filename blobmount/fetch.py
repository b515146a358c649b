"""Remote data through the chunk cache: misses become few, coalesced range requests.

:class:`ChunkedSource` is the :class:`~blobmount.sources.base.RangeSource` (and
:class:`~blobmount.sources.base.Fetching`) the reader sees for a remote data blob. A read is cut
into chunks (cache/chunks.py); each chunk comes from memory, from disk, or from the network. This
module is the read path: what a read, a fill or a prefetch asks for, how long a read waits, and
the integrity support the reader uses. Delivering chunks (single flight, coalescing into runs,
budgets, streaming, landing, retries) is fetch_runs.py's; when to read ahead is readahead.py's.

- **Read-ahead.** Each open file (and each directory of small files) carries a
  :class:`~blobmount.readahead.ReadHint`; each read moves its window (readahead.advance) and the
  window is fetched as several concurrent requests, which fills links with a large
  bandwidth-delay product.
- **Shared windows.** Readers in order at once share one read-ahead budget: with ``n`` of them
  (active within ``READER_IDLE_S``), each window is capped at half the memory tier divided by ``n``
  (one reader alone keeps ``ahead_bytes``). Otherwise 8 readers of 32 MiB windows landed 256 MiB
  ahead into a 64 MiB memory tier: their chunks were evicted before they were read and 700 of 768
  came back from the disk (bench/link_speed.py par8, 2026-12-07).
- **Deadlines.** A read waits at most ``--timeout`` (then EIO; a later read tries afresh: the
  requests it waited for that landed nothing meanwhile are abandoned with it, so no later read joins
  a dead connection).

Concurrency contract: fetch_runs.py's, for the same state (``__init__``). Background tasks live in
the nursery given to :meth:`ChunkedSource.attach` (the mount's), never in a per-request nursery.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from blobmount import defaults, readahead
from blobmount.cache import ChunkStore, MetaStore
from blobmount.daemon import metrics
from blobmount.errors import BlobmountError, SourceError, TransientError
from blobmount.fetch_runs import (
    DEMAND_RESERVED_REQUESTS,
    UNSAVED_CHUNKS,
    ChunkFlight,
    ChunkRuns,
    FetchStats,
    Run,
    flight_seq,
)
from blobmount.pieces import PIECE_BYTES, Pieces
from blobmount.readahead import DEFAULT_AHEAD_BYTES, ReadHint
from blobmount.registry.retry import Retry
from blobmount.sources.base import StreamSource

log = logging.getLogger(__name__)

DEFAULT_REQUEST_BYTES = 8 << 20  # per range request: ~70 ms at 1 Gbit, long enough to leave slow start
DEFAULT_INFLIGHT_BYTES = 256 << 20  # read-ahead stops growing while this much is on its way
READER_IDLE_S = 1.0  # a reader in order that has not read for this long no longer shares the budget

_HITS = metrics.CACHE_HITS.labels(store="chunk")


class ChunkedSource(ChunkRuns):
    """A remote data blob read through the chunk store (module docstring)."""

    def __init__(
        self,
        remote: StreamSource,
        store: ChunkStore,
        *,
        meta: MetaStore | None = None,
        timeout_s: float = defaults.TIMEOUT_S,
        max_requests: int = defaults.MAX_CONNECTIONS,
        request_bytes: int = DEFAULT_REQUEST_BYTES,
        ahead_bytes: int = DEFAULT_AHEAD_BYTES,
        inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
        offline: bool = False,
    ) -> None:
        if store.blob_size != remote.size:
            raise ValueError("chunk store and remote blob disagree on the size")
        self.remote = remote
        self.store = store
        self.meta = meta
        self.timeout_s = timeout_s
        self.max_requests = max(1, max_requests)
        self.request_chunks = max(1, request_bytes // store.chunk_size)
        self.ahead_bytes = ahead_bytes
        self.inflight_limit = inflight_bytes
        self.offline = offline
        self.stats = FetchStats()
        self._retry = Retry()  # the one policy; the source below makes one attempt per call
        self._nursery: trio.Nursery | None = None
        self._flights: dict[int, ChunkFlight] = {}
        self._inflight_bytes = 0
        self._requests = trio.CapacityLimiter(self.max_requests)
        self._ahead = trio.CapacityLimiter(max(1, self.max_requests - DEMAND_RESERVED_REQUESTS))
        self._expected: dict[int, int] = {}  # chunk -> xxh3 it had when a file over it was verified
        self._origin_only: set[int] = set()
        self._unsaved: dict[int, bytes] = {}  # landed, not yet on disk: still served, never refetched
        self._saving: dict[int, trio.Event] = {}  # set when that chunk's write has finished
        self._epoch = 0  # purges so far
        self._purged: dict[int, int] = {}  # chunk -> epoch of its last purge
        self._unsaved_slots = trio.Semaphore(UNSAVED_CHUNKS)
        self._drained = trio.Event()  # set when the last unsaved chunk reaches the disk
        self._readers: dict[int, tuple[ReadHint, float]] = {}  # id -> (hint in order, last read), by last read
        self.pieces: Pieces | None = None  # random reads fetch pieces, not chunks (pieces.py)
        if store.chunk_size >= 4 * PIECE_BYTES and not offline:
            self.pieces = Pieces(
                store.cache,
                store.blob_hex,
                store.blob_size,
                lambda s, e: self.remote.iter_range(s, e),
                retry=self._retry,
                timeout_s=timeout_s,
                on_fetched=self._count_piece,
            )

    # -- RangeSource ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.store.blob_size

    def close(self) -> None:
        self.remote.close()

    async def aclose(self) -> None:
        await self.remote.aclose()

    def attach(self, nursery: trio.Nursery) -> None:
        """Give the source the long-lived nursery its fetches run in (the mount's, or a command's)."""
        self._nursery = nursery
        if self.pieces is not None:
            self.pieces.attach(nursery)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[ChunkedSource]:
        """For commands without a mount: a nursery for the fetches, cancelled on the way out."""
        async with trio.open_nursery() as nursery:
            self.attach(nursery)
            try:
                yield self
                await self.flush()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    async def flush(self) -> None:
        """Wait (at most --timeout) until every landed chunk is on disk: before a command exits,
        or a mount's last moments, so what was fetched is not fetched again."""
        with trio.move_on_after(self.timeout_s):
            while self._unsaved:
                self._drained = trio.Event()
                await self._drained.wait()

    async def read_range(self, start: int, end: int, hint: ReadHint | None = None) -> bytes:
        if not 0 <= start <= end <= self.size:
            raise SourceError(f"range {start}..{end} outside the {self.size}-byte data blob")
        if start == end:
            return b""
        cs = self.store.chunk_size
        first, last = start // cs, (end - 1) // cs
        if self.pieces is not None and Pieces.wanted(hint, start, end) and self._untouched(first, last):
            assert hint is not None
            hint.window, hint.ahead, hint.pos = 0, 0, end  # what _read_ahead does after a jump
            return await self.pieces.read(start, end)
        since = flight_seq()  # flights from here on serve this read; older ones it joined
        waiting_since = trio.current_time()
        missed = self._schedule(range(first, last + 1), ahead=False, keep=hint is None or hint.keep)
        if hint is not None:
            self._read_ahead(hint, start, end, missed)
        with trio.move_on_after(self.timeout_s):
            if first == last:
                data = await self._chunk(first, since=since)
                offset = start - first * cs
                return data[offset : offset + end - start]
            # Hold every chunk (or its flight) now: a read longer than the memory tier must not
            # lose its first chunks to eviction before it has copied them.
            held = [self._peek(i) or self._flights.get(i) for i in range(first, last + 1)]
            parts = []
            for index, item in enumerate(held, first):
                data = item if isinstance(item, bytes) else await self._chunk(index, item, since=since)
                lo = max(start - index * cs, 0)
                hi = min(end - index * cs, len(data))
                parts.append(data[lo:hi] if (lo, hi) != (0, len(data)) else data)
            return b"".join(parts)
        error = TransientError(
            f"bytes {start}-{end} of the data blob did not arrive within --timeout {self.timeout_s:g} s"
        )
        self._abandon_silent(first, last, waiting_since, error)
        raise error

    def _untouched(self, first: int, last: int) -> bool:
        """No chunk in [first, last] is present, on its way, or bound to the checks of the chunk
        path (a verified record's digest, the origin after a purge): pieces may serve the read."""
        for index in range(first, last + 1):
            if (
                index in self._flights
                or index in self._unsaved
                or index in self._expected
                or index in self._origin_only
                or index in self._purged
                or self.store.in_memory(index)
                or self.store.on_disk(index)
            ):
                return False
        return True

    async def pieces_agree(self, start: int, end: int) -> bool:
        """Whether every piece served under [start, end) since the mount holds the bytes the
        chunks hold there (pieces.py, Integrity): a file whose hash matched is verified only then."""
        if self.pieces is None:
            return True
        for index in self.pieces.served(start, end):
            piece = await self.pieces.get(index)
            lo, hi = self.pieces.store.span(index)
            a, b = max(lo, start), min(hi, end)
            if piece is None or piece[a - lo : b - lo] != await self.read_range(a, b):
                log.warning("data blob bytes %d-%d: a piece served earlier differs from the chunks", a, b)
                return False
        return True

    def _count_piece(self, n: int) -> None:
        self.stats.requests += 1
        self.stats.bytes_fetched += n
        metrics.FETCH_BYTES.inc(n)

    def prefetch(self, start: int, end: int, *, request_bytes: int | None = None) -> None:
        """Fetch [start, end) in the background, within the read-ahead budget (best effort).
        `request_bytes`: requests up to this long instead of the usual ones (a reader that will
        consume the range in order gets it in order, at the speed of one stream)."""
        if start < end and self._nursery is not None:
            cs = self.store.chunk_size
            saved = self.request_chunks
            if request_bytes:
                self.request_chunks = max(1, request_bytes // cs)
            try:
                self._schedule(range(start // cs, (end - 1) // cs + 1), ahead=True, load_present=False)
            finally:
                self.request_chunks = saved

    async def fill(
        self,
        ranges: list[tuple[int, int]],
        progress: Callable[[int, int], None] | None = None,
        *,
        ahead: bool = False,
        request_bytes: int | None = None,
    ) -> int:
        """Bring every chunk of `ranges` into the cache, in as few requests as the layout allows
        (contiguous missing chunks are one request, however long, or at most `request_bytes`).
        Returns the bytes fetched; raises the first error once everything that could be fetched
        was. `ahead`: as read-ahead, within its request slots and in-flight budget, so readers'
        own misses go first (chunks past the budget are left out)."""
        cs = self.store.chunk_size
        wanted = sorted({i for a, b in ranges if a < b for i in range(a // cs, (b - 1) // cs + 1)})
        total = sum(self.store.length(i) for i in wanted)
        before = self.stats.bytes_fetched
        longest = max(1, request_bytes // cs) if request_bytes else max(len(wanted), 1)
        saved, self.request_chunks = self.request_chunks, max(self.request_chunks, longest)
        try:
            self._schedule(wanted, ahead=ahead, load_present=False)
        finally:
            self.request_chunks = saved
        done = 0
        error: BlobmountError | None = None
        for index in wanted:
            flight = self._flights.get(index)
            if flight is not None:
                await flight.done.wait()
                if flight.error is not None and error is None:
                    error = flight.error
            done += self.store.length(index)
            if progress is not None:
                progress(done, total)
        await self.flush()
        if error is not None:
            raise error
        return self.stats.bytes_fetched - before

    def cached_bytes(self, start: int, end: int) -> int:
        """How many bytes of [start, end) this host holds (memory or disk): the xattr
        user.blobmount.cached_bytes. One stat per chunk not in memory."""
        if start >= end:
            return 0
        cs = self.store.chunk_size
        total = 0
        for index in range(start // cs, (end - 1) // cs + 1):
            if self.store.in_memory(index) or index in self._unsaved or self.store.on_disk(index):
                lo, hi = self.store.span(index)
                total += min(hi, end) - max(lo, start)
        return total

    # -- integrity support for the reader ------------------------------------------------------

    async def purge(self, start: int, end: int) -> None:
        """Forget [start, end) everywhere and fetch it from the origin next time (a file failed
        verification: its next read must not come from the cache or a mirror)."""
        if start >= end:
            return
        cs = self.store.chunk_size
        first, last = start // cs, (end - 1) // cs
        self._epoch += 1
        for index in range(first, last + 1):
            self.store.forget(index)
            self._unsaved.pop(index, None)
            self._expected.pop(index, None)
            self._origin_only.add(index)
            self._purged[index] = self._epoch
            flight = self._flights.get(index)
            if flight is not None and flight.owner is not None:
                del self._flights[index]  # its bytes still reach whoever waits, never the cache
        if self.pieces is not None:
            self.pieces.purge(start, end)
            await trio.to_thread.run_sync(self.pieces.purge_disk, start, end)
        for index in range(first, last + 1):
            saving = self._saving.get(index)
            if saving is not None:
                await saving.wait()  # a write of the old bytes in progress: delete after it
        await trio.to_thread.run_sync(self.store.purge_disk, first, last)

    async def drop_pieces(self, start: int, end: int) -> None:
        """A file over [start, end) verified: its chunks hold the verified bytes, and a piece
        fetched apart from them must not keep serving others at its offset (pieces.py)."""
        if start < end and self.pieces is not None:
            self.pieces.purge(start, end)
            await trio.to_thread.run_sync(self.pieces.purge_disk, start, end)

    async def saved(self, first: int, last: int) -> None:
        """Wait (at most --timeout) for the disk writes of chunks first..last under way: a verified
        record names those chunks as they are on disk (integrity/records.py)."""
        with trio.move_on_after(self.timeout_s):
            for index in range(first, last + 1):
                saving = self._saving.get(index)
                if saving is not None:
                    await saving.wait()

    def expect(self, first: int, digests: Sequence[int]) -> None:
        """Chunks `first`, `first` + 1, ... were verified as part of a file with these xxh3 digests
        (integrity/records.py): they may no longer change, so a refetch that brings different bytes
        is refused (``_land``)."""
        for i, digest in enumerate(digests):
            self._expected[first + i] = digest

    # -- one chunk -----------------------------------------------------------------------------

    def _peek(self, index: int) -> bytes | None:
        data = self.store.memory_get(index)
        if data is None:
            data = self._unsaved.get(index)
        if data is not None:
            _HITS.inc()
        return data

    async def _chunk(self, index: int, flight: ChunkFlight | None = None, *, since: int = -1) -> bytes:
        """The chunk's bytes, waiting for whatever delivers them. A read that only joined a fetch
        started before it (flight older than `since`: read-ahead, another reader) and saw it fail
        gets one fetch of its own: a fault that cleared meanwhile must not fail it (its own
        --timeout still bounds it)."""
        retried = False
        for _ in range(6):  # bounded: a chunk can vanish between the stat and the load (eviction)
            if flight is None:
                data = self._peek(index)
                if data is not None:
                    return data
                if self.offline and index not in self._flights and not self.store.on_disk(index):
                    raise self._offline_error(index)
                if self._nursery is None:
                    raise SourceError("the data source is not running")
                flight = self._flights.get(index)
                if flight is None:
                    self._schedule((index,), ahead=False)
                    flight = self._flights.get(index)
                    if flight is None:
                        continue
            await flight.done.wait()
            if flight.data is not None:
                return flight.data
            if flight.error is not None:
                if flight.seq >= since or retried or self.offline:
                    raise flight.error
                retried = True
            flight = None
        raise SourceError(f"chunk {index} of the data blob kept disappearing from the cache")

    def _read_ahead(self, hint: ReadHint, start: int, end: int, missed: bool) -> None:
        cs = self.store.chunk_size
        first = hint.pos < 0
        window = readahead.advance(hint, start, end, missed, cs, self.window_cap(hint))
        if not hint.directory:
            # A reader shares the budget from its first read (readers started together must not
            # each take a whole window at their second) while it stays in order and has more than
            # a chunk left: a small file read whole, or a seek, takes no share.
            if (hint.window > 0 or first) and hint.hi - hint.pos > cs:
                self._readers.pop(id(hint), None)  # to the end: the dict stays in order of last read
                self._readers[id(hint)] = (hint, trio.current_time())
            else:
                self._readers.pop(id(hint), None)
        if window is not None:
            frm, to = window
            self._schedule(range(frm // cs, (to - 1) // cs + 1), ahead=True, load_present=False, keep=hint.keep)

    def window_cap(self, hint: ReadHint) -> int:
        """The largest read-ahead window `hint` may have now (module docstring, shared windows):
        what is landed ahead of n readers must fit the memory tier, or it is evicted unread."""
        if hint.directory:
            return self.ahead_bytes
        now = trio.current_time()
        stale = []
        for key, (_, seen) in self._readers.items():  # oldest first: stops at the first one active
            if now - seen <= READER_IDLE_S:
                break
            stale.append(key)
        for key in stale:
            del self._readers[key]
        n = len(self._readers) + (id(hint) not in self._readers)
        if n <= 1:
            return self.ahead_bytes
        share = min(self.ahead_bytes, self.store.memory_bytes // 2) // n
        return max(self.store.chunk_size, share - share % self.store.chunk_size)

    def _abandon_silent(self, first: int, last: int, since: float, error: BlobmountError) -> None:
        """A read gave up on chunks [first, last]: the requests that were to bring them and landed
        nothing while it waited are stalled (a dead connection answers nothing, whatever the
        origin does now), so they are abandoned with the read, not left to wait out their own
        deadlines and retries. Otherwise the next read would join such a request and wait with
        it: re-reading a stalled file once the origin answered again took ~25 s (--timeout 30).
        Their waiters get `error`; a read that joined them gets a request of its own (_chunk)."""
        for index in range(first, last + 1):
            flight = self._flights.get(index)
            run = flight.owner if flight is not None else None
            if isinstance(run, Run) and run.landed_at < since and run.next <= run.last:
                log.debug(
                    "data blob bytes %d-%d: abandoned with the read that waited for it",
                    *self._bytes(run.next, run.last),
                )
                self._fail(run, error)
                run.scope.cancel()
