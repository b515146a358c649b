"""Remote data through the chunk cache: misses become few, coalesced range requests.

:class:`ChunkedSource` is the :class:`~blobmount.source.RangeSource` the reader sees for a remote
data blob. A read is cut into chunks (cache/chunks.py); each chunk comes from memory, from disk, or
from the network, and the network part is where this module earns its keep:

- **Single flight.** At most one fetch per chunk in this process (``_flights``) and, through a
  claim on the cache directory's lock file, on the host: a chunk another daemon is fetching is
  waited for (polling for its file, bounded by ``--timeout``), never fetched twice.
- **Wake as you go.** A request for many chunks streams its body and completes each chunk as its
  last byte arrives: a reader waiting for chunk 3 of a 64-chunk request wakes when chunk 3 lands.
  A failed or cancelled request fails the chunks it had not delivered, so no waiter hangs; the
  next read retries them.
- **Coalescing.** Adjacent missing chunks merge into one request, up to ``request_bytes``.
- **Read-ahead.** Each open file (and each directory of small files) carries a :class:`ReadHint`.
  A file read in order grows its window (1 MiB doubling to ``ahead_bytes``) and a seek resets it;
  the window is fetched as several concurrent requests, which fills links with a large
  bandwidth-delay product. Small files: the first network miss in a directory fetches only that
  file's chunk; from the second on, the directory's data (contiguous: the data blob is in path
  order) is prefetched forward, in a window that grows from ``DIR_STEP_BYTES`` to ``DIR_MAX_BYTES``.
- **Budgets.** Requests in flight are bounded by ``max_requests``, of which read-ahead may use all
  but ``DEMAND_RESERVED_REQUESTS`` (a reader's miss never queues behind a window); read-ahead stops
  growing while ``inflight_bytes`` are on their way.
- **Deadlines.** A read waits at most ``--timeout`` (then EIO; a later read tries afresh: the
  requests it waited for that landed nothing meanwhile are abandoned with it, so no later read joins
  a dead connection). A request that delivers no chunk for ``--timeout`` is a stall: it is abandoned
  and resumed from the first undelivered chunk, as often as the one retry policy allows
  (registry/retry.py: ``MAX_ATTEMPTS`` requests in all).

Concurrency contract: everything here runs on the trio thread except the store's disk methods,
which run through ``trio.to_thread``. ``_flights`` maps a chunk to the one task that will deliver
it (a network run, a disk load, or a wait on another process); that task always sets the flight
(data or error) and removes it, in a ``finally``. Background tasks live in the nursery given to
:meth:`ChunkedSource.attach` (the mount's), never in a per-request nursery. The only checkpoints
inside bookkeeping are the awaits on flights, limiters, disk threads and the network.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import trio

from blobmount import defaults
from blobmount.cache import ChunkStore, MetaStore, chunk_digest
from blobmount.daemon import metrics
from blobmount.errors import BlobmountError, SourceError, TransientError
from blobmount.registry.retry import Retry
from blobmount.source import ReadHint

log = logging.getLogger(__name__)

DEFAULT_REQUEST_BYTES = 8 << 20  # per range request: ~70 ms at 1 Gbit, long enough to leave slow start
DEFAULT_AHEAD_BYTES = 32 << 20  # a sequential reader's largest window: ~0.3 s at 1 Gbit, 25x the
# bandwidth-delay product of a 10 ms link, and half the memory tier (a larger window outran the
# tier: landed chunks were evicted before the reader got there and read back from disk)
INITIAL_WINDOW_BYTES = 1 << 20  # the first read-ahead after two reads in order
DEFAULT_INFLIGHT_BYTES = 256 << 20  # read-ahead stops growing while this much is on its way
DIR_STEP_BYTES = 2 << 20  # a directory of small files is prefetched this much ahead at first,
DIR_MAX_BYTES = 32 << 20  # doubling while the reader keeps up, to at most this much
DEMAND_RESERVED_REQUESTS = 2  # request slots read-ahead may not take
FOREIGN_POLL_MAX_S = 0.1  # waiting for another process's chunk: poll its file at most this often
UNSAVED_CHUNKS = 32  # landed chunks waiting for the disk; a request pauses when this many wait


_FLIGHT_SEQ = itertools.count()
_HITS = metrics.CACHE_HITS.labels(store="chunk")
_MISSES = metrics.CACHE_MISSES.labels(store="chunk")
_DEMAND = metrics.FETCH_CHUNKS.labels(reason="miss")
_AHEAD = metrics.FETCH_CHUNKS.labels(reason="readahead")


@runtime_checkable
class StreamSource(Protocol):
    """A remote data blob that streams byte ranges (remote.py implements it)."""

    @property
    def size(self) -> int: ...

    def iter_range(self, start: int, end: int, *, origin_only: bool = False) -> AsyncGenerator[bytes, None]:
        """Exactly the bytes [start, end), in blocks; raises SourceError (TransientError when
        worth retrying) instead of yielding anything wrong. `origin_only` skips mirrors."""
        ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True, eq=False)
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BlobmountError | None = None
    owner: object = None  # the _Run delivering it (a run only ever settles its own flights)
    seq: int = field(default_factory=lambda: next(_FLIGHT_SEQ))  # creation order


@dataclass(slots=True)
class FetchStats:
    """The few counts the fetcher's callers read back for one source (a prefetch's bytes, a
    profile's request count; tests' behaviour checks). Everything a user sees is in metrics.py."""

    requests: int = 0
    bytes_fetched: int = 0
    ahead_chunks: int = 0  # fetched for read-ahead or prefetch rather than a waiting reader
    retries: int = 0
    changed_chunks: int = 0  # a refetched chunk differed from the one a file was verified with


@dataclass(slots=True, eq=False)  # hashed by identity: a limiter's borrower token
class _Run:
    """Chunks [first, last] fetched by one request; ``next`` is the first not yet delivered;
    ``epoch`` is the purge count when it started (a chunk purged since must not be landed)."""

    first: int
    last: int
    ahead: bool
    epoch: int
    keep: bool = True  # landed chunks are written to the chunk store (ReadHint.keep)
    next: int = -1
    landed_at: float = float("-inf")  # trio clock: when it last landed a chunk
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # abandoning it cancels this

    def __post_init__(self) -> None:
        self.next = self.first


class ChunkedSource:
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
        self._flights: dict[int, _Flight] = {}
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
        since = next(_FLIGHT_SEQ)  # flights from here on serve this read; older ones it joined
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
        for index in range(first, last + 1):
            saving = self._saving.get(index)
            if saving is not None:
                await saving.wait()  # a write of the old bytes in progress: delete after it
        await trio.to_thread.run_sync(self.store.purge_disk, first, last)

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

    async def _chunk(self, index: int, flight: _Flight | None = None, *, since: int = -1) -> bytes:
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

    # -- scheduling ----------------------------------------------------------------------------

    def _schedule(
        self,
        indices: range | tuple[int, ...] | list[int],
        *,
        ahead: bool,
        load_present: bool = True,
        keep: bool = True,
    ) -> bool:
        """Start whatever it takes to deliver each chunk not already in memory or on its way.
        Returns whether any chunk needs the network (a miss). `keep`: fetched chunks go to disk
        too (else memory only: ReadHint.keep)."""
        missed = False
        run: _Run | None = None
        runs: list[_Run] = []
        budget = self.inflight_limit - self._inflight_bytes
        for index in indices:
            if index in self._flights or index in self._unsaved or self.store.memory_get(index) is not None:
                continue
            if self.store.on_disk(index):
                if load_present:
                    self._start(self._load, index)
                continue
            if ahead:
                budget -= self.store.length(index)
                if budget < 0:
                    break
            missed = True
            if self.offline:
                continue  # the reader raises _offline_error
            cache = self.store.cache
            if cache is not None and not cache.try_claim(self.store.claim_key(index)):
                self._start(self._wait_foreign, index)
                continue
            if cache is not None and self.store.on_disk(index):  # finished while we looked
                cache.unclaim(self.store.claim_key(index))
                self._start(self._load, index)
                continue
            if run is not None and run.last == index - 1 and run.last - run.first + 1 < self.request_chunks:
                run.last = index
            else:
                run = _Run(index, index, ahead, self._epoch, keep)
                runs.append(run)
            self._flights[index] = _Flight(owner=run)
            self._inflight_bytes += self.store.length(index)
        for r in runs:
            if self._nursery is None:
                self._fail(r, SourceError("the data source is not running"))
                continue
            self._nursery.start_soon(self._fetch_run, r)
        return missed

    def _offline_error(self, index: int) -> SourceError:
        start, end = self.store.span(index)
        return SourceError(f"--offline: bytes {start}-{end} of the data blob are not in the cache")

    def _start(self, task: Callable[[int, _Flight], object], index: int) -> None:
        flight = self._flights[index] = _Flight()
        if self._nursery is None:
            del self._flights[index]
            flight.error = SourceError("the data source is not running")
            flight.done.set()
            return
        self._nursery.start_soon(task, index, flight)  # type: ignore[arg-type]

    def _read_ahead(self, hint: ReadHint, start: int, end: int, missed: bool) -> None:
        if hint.directory:
            if missed:
                hint.misses += 1
            if hint.misses < 2 or hint.ahead - end >= hint.window // 2:
                return
            hint.window = min(max(hint.window * 2, DIR_STEP_BYTES), DIR_MAX_BYTES)
            frm, to = max(hint.ahead, end), min(hint.hi, end + hint.window)
        else:
            slack = self.store.chunk_size
            in_order = hint.pos >= 0 and hint.pos - slack <= start <= hint.pos + slack
            if in_order:
                hint.window = min(max(hint.window * 2, INITIAL_WINDOW_BYTES), self.ahead_bytes)
                hint.pos = max(hint.pos, end)
            else:
                hint.window, hint.ahead, hint.pos = 0, 0, end
                return
            if hint.ahead - hint.pos >= hint.window // 2:
                return
            frm, to = max(hint.ahead, hint.pos), min(hint.hi, hint.pos + hint.window)
        if to <= frm:
            return
        hint.ahead = to
        cs = self.store.chunk_size
        self._schedule(range(frm // cs, (to - 1) // cs + 1), ahead=True, load_present=False, keep=hint.keep)

    # -- tasks (each delivers its flights, whatever happens) -----------------------------------

    async def _load(self, index: int, flight: _Flight) -> None:
        try:
            data = await trio.to_thread.run_sync(self.store.load, index)
            expected = self._expected.get(index)
            if data is not None and expected is not None and chunk_digest(data) != expected:
                data = None  # cannot happen unless the file was replaced: refetch it
            if data is not None:
                _HITS.inc()
                self.store.memory_put(index, data)
                flight.data = data
        except Exception as exc:
            log.exception("chunk cache: loading chunk %d failed unexpectedly", index)
            flight.error = SourceError(f"internal error while loading a chunk: {exc!r}")
        finally:
            self._flights.pop(index, None)
            flight.done.set()  # no data and no error: the waiter schedules a fetch

    async def _wait_foreign(self, index: int, flight: _Flight) -> None:
        """Another process claimed this chunk: wait for its file, or for the claim to come free
        (that process failed or died) and then fetch it here."""
        assert self.store.cache is not None
        key = self.store.claim_key(index)
        pause = 0.005
        try:
            with trio.move_on_after(self.timeout_s):
                while True:
                    if self.store.on_disk(index):
                        data = await trio.to_thread.run_sync(self.store.load, index)
                        if data is not None:
                            self.store.memory_put(index, data)
                            flight.data = data
                            return
                    if self.store.cache.try_claim(key):
                        self.store.cache.unclaim(key)
                        if not self.store.on_disk(index):
                            return  # free and absent: the waiter schedules the fetch here
                        continue
                    await trio.sleep(pause)
                    pause = min(pause * 2, FOREIGN_POLL_MAX_S)
            flight.error = TransientError(f"chunk {index}: another process did not deliver it within --timeout")
        except Exception as exc:
            log.exception("chunk cache: waiting for chunk %d failed unexpectedly", index)
            flight.error = SourceError(f"internal error while waiting for a chunk: {exc!r}")
        finally:
            self._flights.pop(index, None)
            flight.done.set()

    async def _fetch_run(self, run: _Run) -> None:
        error: BlobmountError = SourceError("fetch cancelled")
        try:
            with run.scope:  # cancelled only by _abandon_silent, which settles the flights itself
                error = await self._fetch_attempts(run) or error
        except Exception as exc:  # a bug must cost one read, never the mount (this task is the nursery's)
            log.exception("fetching data blob bytes %d-%d failed unexpectedly", *self._bytes(run.next, run.last))
            error = SourceError(f"internal error while fetching: {exc!r}")
        finally:
            if run.next <= run.last:
                self._fail(run, error)

    async def _fetch_attempts(self, run: _Run) -> BlobmountError | None:
        """Requests as the one retry policy allows (registry/retry.py), each resuming at the first
        undelivered chunk (the source itself does not retry: one loop); returns the
        last error (None once everything landed)."""
        if run.ahead:  # before a request slot: a queued read-ahead must not hold one a miss needs
            await self._ahead.acquire_on_behalf_of(run)
        try:
            async with self._requests:
                for attempt in itertools.count(1):
                    try:
                        await self._stream(run)
                        return None
                    except BlobmountError as exc:
                        if not self._retry.should_retry(attempt, exc):
                            log.warning("data blob bytes %d-%d: %s", *self._bytes(run.next, run.last), exc)
                            return exc
                        self.stats.retries += 1
                        first, last = self._bytes(run.next, run.last)
                        await self._retry.pause(attempt, exc, f"data blob bytes {first}-{last}: ")
        finally:
            if run.ahead:
                self._ahead.release_on_behalf_of(run)
        return None  # pragma: no cover - the loop always returns

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
            if isinstance(run, _Run) and run.landed_at < since and run.next <= run.last:
                log.debug(
                    "data blob bytes %d-%d: abandoned with the read that waited for it",
                    *self._bytes(run.next, run.last),
                )
                self._fail(run, error)
                run.scope.cancel()

    def _bytes(self, first: int, last: int) -> tuple[int, int]:
        return self.store.span(first)[0], self.store.span(last)[1]

    async def _stream(self, run: _Run) -> None:
        """One range request for chunks [run.next, run.last]; lands each as it completes and
        advances ``run.next``. Raises when the body breaks, stalls or ends early."""
        start, end = self._bytes(run.next, run.last)
        origin_only = any(i in self._origin_only for i in range(run.next, run.last + 1))
        self.stats.requests += 1
        metrics.FETCH_REQUESTS.inc()
        metrics.FETCH_IN_FLIGHT.inc()
        try:
            await self._stream_body(run, start, end, origin_only)
        finally:
            metrics.FETCH_IN_FLIGHT.dec()

    async def _stream_body(self, run: _Run, start: int, end: int, origin_only: bool) -> None:
        parts: list[bytes] = []  # blocks of the chunk being assembled: joined once, not appended to
        have = 0
        with trio.CancelScope(deadline=trio.current_time() + self.timeout_s) as scope:
            async with aclosing(self.remote.iter_range(start, end, origin_only=origin_only)) as blocks:
                async for block in blocks:
                    parts.append(block)
                    have += len(block)
                    while run.next <= run.last and have >= (n := self.store.length(run.next)):
                        joined = parts[0] if len(parts) == 1 else b"".join(parts)
                        data, rest = (joined, b"") if len(joined) == n else (joined[:n], joined[n:])
                        parts, have = ([rest] if rest else []), len(rest)
                        await self._unsaved_slots.acquire()  # the disk sets the pace when it is slower
                        self._land(run, bytes(data))
                        run.next += 1
                        run.landed_at = trio.current_time()
                        scope.deadline = trio.current_time() + self.timeout_s
        if scope.cancelled_caught:
            raise TransientError(f"no chunk arrived within --timeout {self.timeout_s:g} s (stalled)")
        if run.next <= run.last:
            raise TransientError(f"the body ended early, {have} bytes into chunk {run.next}")

    def _land(self, run: _Run, data: bytes) -> None:
        """Chunk ``run.next`` arrived: wake its waiters, keep it in memory, write it to disk
        (unless the run is not to be kept: then the chunk is dropped from memory in time, its
        claim freed now, so another process that wants it fetches it itself)."""
        index = run.next
        self._inflight_bytes -= len(data)
        flight = self._flights.get(index)
        mine = flight is not None and flight.owner is run
        if mine:
            del self._flights[index]
        if self._purged.get(index, -1) >= run.epoch:  # purged while on its way: never cached
            self._unsaved_slots.release()
            if self.store.cache is not None:
                self.store.cache.unclaim(self.store.claim_key(index))
            if mine:
                flight.data = data  # type: ignore[union-attr]
                flight.done.set()  # type: ignore[union-attr]
            return
        expected = self._expected.get(index)
        digest = chunk_digest(data) if run.keep or expected is not None else 0
        if expected is not None and digest != expected:
            self.stats.changed_chunks += 1
            self._origin_only.add(index)
            self._unsaved_slots.release()
            self._inflight_bytes += len(data)
            if mine:
                self._flights[index] = flight  # type: ignore[assignment]
            raise TransientError(
                f"chunk {index} differs from the bytes a file was verified with; refetching from the origin"
            )
        self._origin_only.discard(index)
        self.store.memory_put(index, data)
        self.stats.bytes_fetched += len(data)
        metrics.FETCH_BYTES.inc(len(data))
        if run.ahead:
            self.stats.ahead_chunks += 1
            _AHEAD.inc()
        else:
            if mine:
                _MISSES.inc()
            _DEMAND.inc()
        if mine:
            flight.data = data  # type: ignore[union-attr]
            flight.done.set()  # type: ignore[union-attr]
        if run.keep and self.store.cache is not None and self._nursery is not None:
            self._unsaved[index] = data
            self._saving[index] = trio.Event()
            self._nursery.start_soon(self._persist, index, data, digest)
        else:
            self._unsaved_slots.release()
            if self.store.cache is not None:
                self.store.cache.unclaim(self.store.claim_key(index))

    async def _persist(self, index: int, data: bytes, digest: int) -> None:
        """Write a landed chunk to disk, then free its claim (other processes wait for the file)."""
        try:
            await trio.to_thread.run_sync(self.store.store, index, data, digest)
        except Exception:  # the chunk stays in memory; a bug here must not end the mount
            log.exception("chunk cache: storing chunk %d failed unexpectedly", index)
        finally:
            if self._unsaved.get(index) is data:
                del self._unsaved[index]
            self._unsaved_slots.release()
            saving = self._saving.pop(index, None)
            if saving is not None:
                saving.set()
            if not self._unsaved:
                self._drained.set()
            if self.store.cache is not None:
                self.store.cache.unclaim(self.store.claim_key(index))

    def _fail(self, run: _Run, error: BlobmountError) -> None:
        """Settle the run's undelivered chunks with `error` (the next read tries afresh)."""
        for index in range(run.next, run.last + 1):
            self._inflight_bytes -= self.store.length(index)
            if self.store.cache is not None:
                self.store.cache.unclaim(self.store.claim_key(index))
            flight = self._flights.get(index)
            if flight is not None and flight.owner is run:
                del self._flights[index]
                flight.error = error
                flight.done.set()
        run.next = run.last + 1
