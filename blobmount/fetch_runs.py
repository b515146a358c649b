"""Chunk runs: how the chunks a read (or read-ahead, or a fill) needs are delivered, the half of
:class:`~blobmount.fetch.ChunkedSource` below its read path.

- **Single flight.** At most one delivery per chunk in this process (``_flights``) and, through a
  claim on the cache directory's lock file, on the host: a chunk another daemon is fetching is
  waited for (polling for its file, bounded by ``--timeout``), never fetched twice.
- **Coalescing.** Adjacent missing chunks merge into one request (a :class:`Run`), up to
  ``request_chunks``.
- **Wake as you go.** A request for many chunks streams its body and completes each chunk as its
  last byte arrives: a reader waiting for chunk 3 of a 64-chunk request wakes when chunk 3 lands.
  A failed or cancelled request fails the chunks it had not delivered, so no waiter hangs; the
  next read retries them.
- **Budgets.** Requests in flight are bounded by ``max_requests``, of which read-ahead may use all
  but ``DEMAND_RESERVED_REQUESTS`` (a reader's miss never queues behind a window); read-ahead stops
  growing while ``inflight_bytes`` are on their way; a slow disk paces requests (UNSAVED_CHUNKS).
- **Deadlines.** A request that delivers no chunk for ``--timeout`` is a stall: it is abandoned
  and resumed from the first undelivered chunk, as often as the one retry policy allows
  (registry/retry.py: ``MAX_ATTEMPTS`` requests in all). A read's own deadline is fetch.py's.

Concurrency contract: everything here runs on the trio thread except the store's disk methods,
which run through ``trio.to_thread``. ``_flights`` maps a chunk to the one task that will deliver
it (a network run, a disk load, or a wait on another process); that task always sets the flight
(data or error) and removes it, in a ``finally``. Tasks run in the long-lived nursery given to
``ChunkedSource.attach``, never in a per-request nursery. The only checkpoints inside bookkeeping
are the awaits on flights, limiters, disk threads and the network.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import trio

from blobmount.cache import ChunkStore, chunk_digest
from blobmount.daemon import metrics
from blobmount.errors import BlobmountError, SourceError, TransientError
from blobmount.registry.retry import Retry
from blobmount.sources.base import StreamSource

log = logging.getLogger("blobmount.fetch")  # the fetcher's one logger name (JSON logs carry it)

DEMAND_RESERVED_REQUESTS = 2  # request slots read-ahead may not take
FOREIGN_POLL_MAX_S = 0.1  # waiting for another process's chunk: poll its file at most this often
UNSAVED_CHUNKS = 32  # landed chunks waiting for the disk; a request pauses when this many wait

_FLIGHT_SEQ = itertools.count()
_HITS = metrics.CACHE_HITS.labels(store="chunk")
_MISSES = metrics.CACHE_MISSES.labels(store="chunk")
_DEMAND = metrics.FETCH_CHUNKS.labels(reason="miss")
_AHEAD = metrics.FETCH_CHUNKS.labels(reason="readahead")


def flight_seq() -> int:
    """The next flight number: flights created from now on compare greater (ChunkFlight.seq)."""
    return next(_FLIGHT_SEQ)


@dataclass(slots=True, eq=False)
class ChunkFlight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BlobmountError | None = None
    owner: object = None  # the Run delivering it (a run only ever settles its own flights)
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
class Run:
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


class ChunkRuns:
    """Planning and delivering chunks for :class:`~blobmount.fetch.ChunkedSource` (module docstring).
    No state of its own: the one table of chunk state is ChunkedSource.__init__'s, declared here."""

    remote: StreamSource
    store: ChunkStore
    timeout_s: float
    offline: bool
    request_chunks: int
    inflight_limit: int
    stats: FetchStats
    _retry: Retry
    _nursery: trio.Nursery | None
    _flights: dict[int, ChunkFlight]
    _inflight_bytes: int
    _requests: trio.CapacityLimiter
    _ahead: trio.CapacityLimiter
    _expected: dict[int, int]
    _origin_only: set[int]
    _unsaved: dict[int, bytes]
    _saving: dict[int, trio.Event]
    _epoch: int
    _purged: dict[int, int]
    _unsaved_slots: trio.Semaphore
    _drained: trio.Event

    # -- planning: which chunks need what ---------------------------------------------------

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
        run: Run | None = None
        runs: list[Run] = []
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
                run = Run(index, index, ahead, self._epoch, keep)
                runs.append(run)
            self._flights[index] = ChunkFlight(owner=run)
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

    def _start(self, task: Callable[[int, ChunkFlight], object], index: int) -> None:
        flight = self._flights[index] = ChunkFlight()
        if self._nursery is None:
            del self._flights[index]
            flight.error = SourceError("the data source is not running")
            flight.done.set()
            return
        self._nursery.start_soon(task, index, flight)  # type: ignore[arg-type]

    # -- tasks (each delivers its flights, whatever happens) -----------------------------------

    async def _load(self, index: int, flight: ChunkFlight) -> None:
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

    async def _wait_foreign(self, index: int, flight: ChunkFlight) -> None:
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

    async def _fetch_run(self, run: Run) -> None:
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

    async def _fetch_attempts(self, run: Run) -> BlobmountError | None:
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

    def _bytes(self, first: int, last: int) -> tuple[int, int]:
        return self.store.span(first)[0], self.store.span(last)[1]

    async def _stream(self, run: Run) -> None:
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

    async def _stream_body(self, run: Run, start: int, end: int, origin_only: bool) -> None:
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

    def _land(self, run: Run, data: bytes) -> None:
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
        # The trailer's xxh3 is computed by the writer, on its thread, unless this chunk must be
        # checked now (a file was verified over it): off the trio thread, which every FUSE read
        # and every landed chunk waits for.
        digest = chunk_digest(data) if expected is not None else None
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

    async def _persist(self, index: int, data: bytes, digest: int | None) -> None:
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

    def _fail(self, run: Run, error: BlobmountError) -> None:
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
