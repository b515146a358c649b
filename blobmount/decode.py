"""One streaming decode of a large zstd file, shared by every reader of the file while it runs.

Why: a zstd frame can only be decoded from its start, and a multi-GB file decoded whole before its
first byte is served makes time to first byte the whole fetch and decode. A :class:`Decode` runs the
decoder on a worker thread (zstandard and hashlib release the GIL), reading compressed bytes through
the source (the fetcher, reached with ``trio.from_thread``), and publishes a watermark: a read of
``[offset, end)`` returns as soon as the decoder has passed ``end``. The output goes to

- a file (a temp file of the content store, :meth:`ContentStore.begin`) when the decoded file fits
  the store: every byte stays readable, and once verified the file is committed to the store, so
  later opens are served from it; or
- a bounded ring in memory (``window`` bytes) when it does not: the decoder waits for the slowest
  attached reader (:meth:`touch`) instead of overwriting bytes it is about to read; a read below the
  window raises :class:`Behind`, and the caller starts another decode for it.

sha256 (and xxh3, the store's trailer) are computed as the bytes are decoded; the verdict is known
when the decoder reaches the end, and a read that ends at the end of the file waits for it.

:func:`decode_frame` is the other way to decode, for a file verified before it is served: the whole
frame at once into a sink (memory or a content-store temp file), checked at its end (integrity/whole.py).

Concurrency: the worker thread touches only the output, the hashers and, under ``_lock``, the ring
and the cursors; it hands the watermark to the trio thread with ``run_sync_soon`` (never blocking
on it). Everything else runs on the trio thread.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import io
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

import trio
import zstandard

from blobmount.errors import IntegrityError, SourceError
from blobmount.hashing import STEP_BYTES, Hashing
from blobmount.index import Entry
from blobmount.index.paths import show
from blobmount.rangestream import RangeStream, Stopped
from blobmount.readahead import ReadHint
from blobmount.sources.base import Fetching, RangeSource, SyncRangeSource

WINDOW_BYTES = 64 << 20  # ring of a decode too large for the store (memory, per decode)
MIN_WINDOW_BYTES = 4 << 20
INPUT_BYTES = 8 << 20  # compressed bytes per hop to the trio thread, once a decode is under way
FEED_AHEAD_BYTES = 16 << 20  # compressed bytes a Feed holds ahead of the decoder (memory, per decode)
FEED_STEP_BYTES = 1 << 20  # a Feed's read when the source has no chunks (else one chunk, within bounds)
FEED_FIRST_AHEAD_BYTES = 8 << 20  # the fetcher's read-ahead from a Feed's second read on, at once
FIRST_STEP_BYTES = 64 << 10  # the first output step; then as long as what came before, up to
# STEP_BYTES (64K, 64K, 128K, ... 1M: the steps end on STEP_BYTES boundaries, like the kernel's reads)
HOLD_BLOCKS = 8  # decoded blocks of a decode into the store held in memory for its readers (STEP_BYTES each)
ROOM_WAIT_S = 0.2  # the ring's decoder re-checks for a stop (or an idle reader) this often
LINGER_S = 2.0  # a decode nobody reads any more is stopped after this (unless a reader comes back)
IDLE_S = 1.0  # a ring holds its window for readers that read within this; an idle one is left behind
FRAME_FAILED = "corrupt zstd frame or sha256 mismatch"  # what a failed decode_frame is, in one warning


class Behind(Exception):
    """The read starts below the ring's window: those bytes are gone; decode again."""


class Feed:
    """The compressed frame of a decode, read in order on the trio thread ahead of the decoder.

    Why: read on demand (:class:`~blobmount.rangestream.RangeStream`), every hop is a round trip
    the decoder waits for (a wake-up of the trio thread, the chunks joined into one ``bytes``, two
    more copies through ``RawIOBase.read``): 10 % of the decoder's thread in a profile of a cold
    384 MiB read, on the decode's critical path. Here a trio task (:meth:`run`) reads one chunk
    after another (chunk-aligned: a chunk comes back as the fetcher holds it, no copy) into a
    queue of at most ``FEED_AHEAD_BYTES``, and the decoder takes them as they are (:meth:`read`,
    what zstd's ``stream_reader`` calls), waiting only when the network is behind.

    A failed read (the fetcher's ``--timeout`` included) is handed to the decoder, which fails with
    it; :meth:`Decode.stop` cancels the read under way (``Decode.reading``), and a feeder that is
    cancelled or fails never leaves the decoder waiting. Concurrency: the queue is under ``_cond``;
    :meth:`run` is the trio thread's, :meth:`read` the decoder thread's."""

    def __init__(self, decode: Decode, source: RangeSource, start: int, end: int, keep: bool) -> None:
        self._decode = decode
        self._source = source
        self._start = self._pos = start
        self._end = end
        self._hint = ReadHint(start, end, keep=keep)
        step = source.store.chunk_size if isinstance(source, Fetching) else FEED_STEP_BYTES
        self._step = max(64 << 10, min(step, 4 << 20))
        self._blocks: collections.deque[bytes] = collections.deque()
        self._held = 0  # bytes in _blocks
        self._over: BaseException | None = None  # why no more blocks come (None: more will)
        self._cond = threading.Condition()
        self._room: trio.Event | None = None  # the feeder waits for room (set from the decoder's thread)
        self._token = trio.lowlevel.current_trio_token()

    async def run(self) -> None:
        """Trio thread: the frame's chunks in order into the queue, then the end (or the error)."""
        decode, over = self._decode, None
        try:
            while self._pos < self._end:
                await self._wait_room()
                nxt = min(self._end, (self._pos // self._step + 1) * self._step)
                data = b""
                with trio.CancelScope() as scope:
                    decode.reading = scope
                    if not decode.stopped:
                        data = await self._source.read_range(self._pos, nxt, self._hint)
                decode.reading = None
                if scope.cancelled_caught or decode.stopped:
                    raise Stopped(f"{show(decode.entry.path)}: decode stopped: no reader left")
                if len(data) != nxt - self._pos:
                    raise SourceError(f"{show(decode.entry.path)}: bytes {self._pos}-{nxt} of the frame came out short")
                if self._pos == self._start:
                    # the first chunk came alone (the first byte waits for nothing else); from the
                    # next read on, the frame is a stream read to its end: the fetcher reads
                    # FEED_FIRST_AHEAD_BYTES ahead at once (readahead.advance doubles the window),
                    # not one cold chunk after another until two reads in order (~14 ms each from
                    # the loopback registry, timelines of a cold 64 MiB read)
                    self._hint.pos, self._hint.window = nxt, FEED_FIRST_AHEAD_BYTES // 2
                with self._cond:
                    self._blocks.append(data)
                    self._held += len(data)
                    self._cond.notify()
                self._pos = nxt
        except Exception as exc:
            over = exc
        finally:
            decode.reading = None
            if over is None:  # the whole frame, or cancelled (the decode is being stopped)
                done = self._pos >= self._end
                over = EOFError() if done else Stopped(f"{show(decode.entry.path)}: decode stopped: input cancelled")
            with self._cond:  # the decoder never waits on a feeder that is gone (cancelled too)
                self._over = over
                self._cond.notify()

    async def _wait_room(self) -> None:
        while True:
            with self._cond:
                if self._held < FEED_AHEAD_BYTES:
                    return
                room = self._room = trio.Event()
            await room.wait()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Decoder thread: the next chunk of the frame (less than `size` only at its end; b"" at
        the end), waiting while the feeder is behind; raises what stopped the feeder."""
        with self._cond:
            while not self._blocks:
                if self._over is not None:
                    if isinstance(self._over, EOFError):
                        return b""
                    raise self._over
                if self._decode.stopped:
                    raise Stopped(f"{show(self._decode.entry.path)}: decode stopped: no reader left")
                self._cond.wait(ROOM_WAIT_S)
            data = self._blocks[0]
            if 0 <= size < len(data):
                self._blocks[0] = data[size:]
                data = data[:size]
            else:
                self._blocks.popleft()
            self._held -= len(data)
            room = self._room
            if room is not None and self._held < FEED_AHEAD_BYTES:
                self._room = None
                self._token.run_sync_soon(room.set)
        return data


class Decode:
    """A running (or finished) decode of `entry` into `fd` (a pre-sized file) or a ring."""

    def __init__(
        self,
        entry: Entry,
        source: RangeSource,
        fd: int | None,
        window: int,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        """`prepare`: run on the hashing thread once the first block is out (the store's
        preallocation of `fd`: never before the first byte)."""
        self.entry = entry
        self._prepare = prepare
        self.source = source
        self.fd = fd
        self.window = window
        self.upto = 0  # decoded bytes published to the trio thread
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.xxh3 = 0  # of the whole content, once done without error
        self.settled = False  # its output committed or given up (the owner's, after `done`)
        self.settled_event = trio.Event()  # set with `settled`: a read that came between waits for it
        self._ring = bytearray(window) if fd is None else None
        self._base = 0  # ring: lowest offset still held (under _lock)
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._cursors: dict[int, tuple[int, float]] = {}  # reader -> (offset it reads from, when)
        self._stop = False
        self._worked = False  # the worker thread returned (the decode is over, done or not)
        self._waiters: list[tuple[int, int, trio.Event]] = []  # (end, seq, event), a heap
        self._seq = itertools.count()
        self._token: trio.lowlevel.TrioToken | None = None
        self.reading: trio.CancelScope | None = None  # the source read under way (trio thread)
        # a decode into a file: its last decoded blocks, (start, end, buffer), oldest first, held
        # by the trio thread for the reads that come while they are fresh (:meth:`read_view`)
        self._held: collections.deque[tuple[int, int, bytearray]] = collections.deque()
        self._hashing: Hashing | None = None

    @property
    def stopped(self) -> bool:
        return self._stop

    @property
    def ring(self) -> bool:
        return self._ring is not None

    def holds(self, offset: int) -> bool:
        """Whether a read from `offset` can be served by this decode (now or once it gets there)."""
        if self._stop or (self.done.is_set() and self.error is not None and offset >= self.upto):
            return False
        with self._lock:
            return offset >= self._base

    # -- readers (trio thread) -------------------------------------------------------------------

    def touch(self, reader: int, offset: int) -> None:
        """`reader` reads from `offset` now: a ring keeps the bytes from there (a little slack
        below, for the kernel's reads that arrive out of order)."""
        with self._lock:
            self._cursors[reader] = (offset, time.monotonic())
            self._room.notify_all()

    def leave(self, reader: int) -> int:
        """`reader` is gone; returns how many readers are left."""
        with self._lock:
            self._cursors.pop(reader, None)
            self._room.notify_all()
            return len(self._cursors)

    @property
    def readers(self) -> int:
        return len(self._cursors)

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._room.notify_all()
        if self.reading is not None:
            self.reading.cancel()

    async def read(self, offset: int, end: int, final: bool) -> bytes:
        """Bytes [offset, end) once decoded; `final` (the read reaches the end of the file): once
        the whole file is decoded and its hash checked, raising the verdict if it is not good."""
        data = await self.read_view(offset, end, final)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_view(self, offset: int, end: int, final: bool) -> bytes | memoryview:
        """:meth:`read`, for a caller that hands the bytes on at once and keeps nothing (the
        kernel's reads: fs.py to pyfuse3's reply): bytes still held in memory come as a view of
        the decoder's buffer, no copy and no ``pread`` (4-8 % of the daemon's CPU in a cold read,
        with the page faults of a new 1 MiB ``bytes`` each). A buffer is reused only once no view
        of it is left (:func:`_unexported`), so a view that is kept keeps its bytes."""
        if final:
            await self.done.wait()
            if self.error is not None:
                raise self.error
        while self.upto < end:
            if self.done.is_set():
                raise self.error or SourceError(f"{show(self.entry.path)}: decode ended at byte {self.upto}")
            event = trio.Event()
            heapq.heappush(self._waiters, (end, next(self._seq), event))
            await event.wait()
        if self._ring is None:
            held = self._view(offset, end)
            if held is not None:
                return held
            assert self.fd is not None
            if end - offset <= STEP_BYTES:
                return os.pread(self.fd, end - offset, offset)
            return await trio.to_thread.run_sync(os.pread, self.fd, end - offset, offset)
        with self._lock:
            if offset < self._base:
                raise Behind
            w = self.window
            a, b = offset % w, end % w or w
            if a < b and end - offset <= w:
                return bytes(self._ring[a:b])
            return bytes(self._ring[a:]) + bytes(self._ring[:b])

    def _view(self, offset: int, end: int) -> memoryview | None:
        """[offset, end) from one held block, or None."""
        for start, stop, buf in reversed(self._held):
            if start <= offset and end <= stop:
                return memoryview(buf)[offset - start : end - start]
            if stop <= offset:
                break  # older blocks are further below
        return None

    def _hold(self, pos: int, buf: bytearray, n: int) -> None:
        """Trio thread: decoded bytes [pos, pos + n), written, are `buf`'s: held for the reads to
        come (the oldest block goes back to the decoder), then published."""
        held = self._held
        held.append((pos, pos + n, buf))
        while len(held) > HOLD_BLOCKS:
            self._give_back(held.popleft()[2])
        self._publish(pos + n)

    def _give_back(self, buf: bytearray) -> None:
        hashing = self._hashing
        assert hashing is not None
        # a view of it still alive (a caller kept one): it stays theirs, the decoder gets a new one
        hashing.recycle(buf if _unexported(buf) else bytearray(len(buf)))

    def drop_held(self) -> None:
        """Trio thread: the held blocks go (the decode is over; reads go to the file)."""
        self._held.clear()

    def _publish(self, upto: int) -> None:
        self.upto = max(self.upto, upto)
        while self._waiters and self._waiters[0][0] <= self.upto:
            heapq.heappop(self._waiters)[2].set()

    def _wake_all(self) -> None:
        while self._waiters:
            heapq.heappop(self._waiters)[2].set()

    # -- the decoder -------------------------------------------------------------------------------

    async def run(self, on_done: Callable[[Decode], None]) -> None:
        """Decode to the end (or until stopped or failed); `on_done` sees the outcome before any
        waiting reader does. Runs in the reader's long-lived nursery."""
        self._token = trio.lowlevel.current_trio_token()
        entry = self.entry
        start, end = entry.data_offset, entry.data_offset + entry.data_size
        # into the store: its compressed bytes are not kept (a ring's are: a restart reads them)
        keep = self.fd is None
        stream: Feed | RangeStream
        if isinstance(self.source, SyncRangeSource):  # a local file: read on the decoder's thread
            stream = RangeStream(self.source, start, end, self, keep=keep)
        else:
            stream = Feed(self, self.source, start, end, keep)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_cancelled)  # a worker thread is not cancellable
                if isinstance(stream, Feed):
                    nursery.start_soon(stream.run)
                try:
                    self.xxh3 = await trio.to_thread.run_sync(self._work, stream)
                except Exception as exc:
                    self.error = exc
                finally:
                    self._worked = True
                    nursery.cancel_scope.cancel()
        except BaseException:
            self.error = Stopped(f"{show(self.entry.path)}: decode cancelled")
            self._finish(on_done)
            raise
        self._finish(on_done)

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            if not self._worked:
                self.stop()

    def _finish(self, on_done: Callable[[Decode], None]) -> None:
        try:
            on_done(self)
        finally:
            self.done.set()
            self._wake_all()

    def _work(self, stream: Feed | RangeStream) -> int:
        """Worker thread: decode `stream` (the frame), hash, write, publish. Returns the content's
        xxh3."""
        entry = self.entry
        size = entry.original_size
        hashing = self._hashing = Hashing(self._put_and_publish, self._prepare, 0 if self.ring else HOLD_BLOCKS)
        pos = 0
        try:
            with zstandard.ZstdDecompressor().stream_reader(stream, read_size=INPUT_BYTES) as reader:  # type: ignore[arg-type]
                while True:
                    if self._stop:
                        raise Stopped(f"{show(entry.path)}: decode stopped at byte {pos}: no reader left")
                    buf = hashing.buffer()
                    step = min(max(pos, FIRST_STEP_BYTES), STEP_BYTES)  # the first bytes soon (TTFB)
                    n = reader.readinto(memoryview(buf)[:step])  # into a recycled buffer: no new
                    # 1 MiB object (and its page faults) per step
                    if not n:
                        hashing.recycle(buf)
                        break
                    if pos + n > size:
                        raise IntegrityError(
                            f"{show(entry.path)}: zstd frame decodes past original_size {size}; refused"
                        )
                    hashing.put(pos, buf, n)  # hashed, written and published on the hashing thread
                    pos += n
        except zstandard.ZstdError as exc:
            hashing.close(check=False)
            raise IntegrityError(
                f"{show(entry.path)}: corrupt zstd frame (expected sha256 {entry.hash.hex()}): {exc}"
            ) from exc
        except BaseException:
            hashing.close(check=False)
            raise
        digest, xxh3 = hashing.close()
        if pos != size:
            raise IntegrityError(f"{show(entry.path)}: zstd frame decodes to {pos} bytes, original_size is {size}")
        if digest != entry.hash:
            raise IntegrityError(
                f"{show(entry.path)}: sha256 mismatch: expected {entry.hash.hex()}, got {digest.hex()}"
            )
        return xxh3

    def _put_and_publish(self, pos: int, block: memoryview) -> bool:
        """The hashing thread: the block goes to the output, then its end to the readers; a
        decode into a file hands its buffer to the trio thread too (:meth:`_hold`; returns True)."""
        self._put(pos, block)
        token = self._token
        assert token is not None
        if self._ring is None:
            buf = block.obj
            assert isinstance(buf, bytearray)
            token.run_sync_soon(self._hold, pos, buf, len(block))
            return True
        token.run_sync_soon(self._publish, pos + len(block))
        return False

    def _put(self, pos: int, block: memoryview) -> None:
        if self._ring is None:
            assert self.fd is not None
            view = block
            while view:
                n = os.pwrite(self.fd, view, pos)
                view, pos = view[n:], pos + n
            return
        w = self.window
        slack = w // 4
        end = pos + len(block)
        with self._lock:
            # wait until every reader still reading is past the bytes this block overwrites
            while not self._stop and end - w > self._slowest(end) - slack:
                self._room.wait(ROOM_WAIT_S)
            if self._stop:  # never published: nothing was written
                raise Stopped(f"{show(self.entry.path)}: decode stopped at byte {pos}: no reader left")
            self._base = max(self._base, end - w)
            a = pos % w
            first = min(len(block), w - a)
            self._ring[a : a + first] = block[:first]
            if first < len(block):
                self._ring[: len(block) - first] = block[first:]

    def _slowest(self, default: int) -> int:
        """Under _lock: the lowest offset a reader that read lately reads from. An idle reader does
        not hold up the others (nor the decode): if it reads again below the window, it restarts."""
        recent = time.monotonic() - IDLE_S
        return min((at for at, when in self._cursors.values() if when >= recent), default=default)


def _unexported(buf: bytearray) -> bool:
    """Whether no view of `buf` is alive (a memoryview, or one derived from it, or a buffer a C
    extension holds): only then can a bytearray resize, so try one that changes nothing (its last
    byte, a byte of a buffer about to be overwritten, becomes 0)."""
    try:
        del buf[-1:]
    except BufferError:
        return False
    buf.append(0)
    return True


def window_for(store_bytes: int) -> int:
    """The ring of a decode too large for the store: a quarter of the store, within bounds."""
    return max(MIN_WINDOW_BYTES, min(WINDOW_BYTES, store_bytes // 4))


def frame_input(entry: Entry, source: RangeSource, compressed: bytes | None = None, keep: bool = True) -> io.RawIOBase:
    """Trio thread: the input of :func:`decode_frame`: `compressed` (the frame, fetched already),
    or the frame read from `source` as the decoder goes (`keep=False`: its chunks are not written
    to the chunk cache, RangeStream)."""
    if compressed is not None:
        return io.BytesIO(compressed)  # type: ignore[return-value]
    end = entry.data_offset + entry.data_size
    return RangeStream(source, entry.data_offset, end, keep=keep)


def decode_frame(entry: Entry, stream: io.RawIOBase, out: BinaryIO) -> None:
    """Worker thread (or the trio thread, for a frame in memory): decode the entry's whole frame
    from `stream` into `out`, verifying size and sha256 (IntegrityError: the bytes are bad)."""
    dctx = zstandard.ZstdDecompressor()
    hasher = hashlib.sha256()
    total = 0
    try:
        source = dctx.stream_reader(stream, read_size=STEP_BYTES)  # type: ignore[arg-type]
        with source as reader:
            while True:
                block = reader.read(STEP_BYTES)
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
        expected = entry.hash.hex()
        raise IntegrityError(f"{show(entry.path)}: corrupt zstd frame (expected sha256 {expected}): {exc}") from exc
    if total != entry.original_size:
        raise IntegrityError(
            f"{show(entry.path)}: zstd frame decodes to {total} bytes, original_size is {entry.original_size}"
        )
    if hasher.digest() != entry.hash:
        raise IntegrityError(
            f"{show(entry.path)}: sha256 mismatch: expected {entry.hash.hex()}, got {hasher.digest().hex()}"
        )
