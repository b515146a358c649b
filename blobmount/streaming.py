"""The reader's part for large zstd files served while they decode: which decode serves a read, when
one starts and stops, and what its verdict does (the mechanism, one decode, is decode.py).

Policy (the "Trust first" guarantees of lazily verified raw files, integrity/__init__.py):
- a read returns once the decoder has passed its end, at most ``wait_s`` later (EIO, the decode
  goes on); the read that reaches the end of the file waits for the verdict;
- a mismatch found at the end is a distrust: that read fails, every handle opened before fails
  from then on (generation), the kernel's pages are dropped, and the file is decoded whole once
  more, its chunks purged so the bytes come from the origin, before another byte is served; a
  mismatch then poisons it;
- a decode nobody reads stops after ``LINGER_S`` (not under ``background``); one that served bytes
  and ended without a verdict drops the kernel's pages, so no unverified page outlives it;
- the first decode of a file writes a content-store temp file, committed once verified (later opens
  are served from the store); a file the store cannot take goes through a bounded ring, and a read
  behind the ring's window starts another decode (the old one goes on to its verdict).

The strategy of :class:`blobmount.reader.Reader` for those files; a mismatch and the read once more
from the origin go through integrity/. Touched only from the trio thread.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import TYPE_CHECKING

import trio

from blobmount.cache import ContentStore, StoreUnavailable
from blobmount.cache.content import Pending
from blobmount.daemon import metrics
from blobmount.decode import LINGER_S, Behind, Decode, window_for
from blobmount.errors import BlobmountError, IntegrityError, InvalidArchive, LimitExceeded, SourceError
from blobmount.flight import Flights
from blobmount.index import Entry
from blobmount.index.paths import show
from blobmount.integrity import Integrity
from blobmount.smallfiles import pread
from blobmount.sources.base import RangeSource

if TYPE_CHECKING:
    from blobmount.reader import Handle

log = logging.getLogger("blobmount.reader")


class StreamedFiles:
    """Large zstd files served while they decode (module docstring)."""

    def __init__(self, source: RangeSource, store: ContentStore, integrity: Integrity) -> None:
        self.source = source
        self.store = store
        self.integrity = integrity
        self.config = integrity.config
        self._decodes: dict[int, list[Decode]] = {}  # entry -> decodes running for it
        self._pending: dict[int, Pending] = {}  # id(decode) -> its content-store temp file
        self._starting: Flights[int] = Flights()  # entry -> its new decode being registered

    async def open(self, handle: Handle) -> None:
        entry, integrity = handle.entry, self.integrity
        handle.generation = integrity.generation_of(entry)
        if entry.number not in integrity.suspect:
            fd = await self.store.open(entry.hash.hex())
            if fd is not None:  # decoded and verified before (only verified content is committed)
                handle.content_fd = fd
                integrity.verified.add(entry.number)
                return
        handle.stream = True  # the decode starts with the first read, not here

    async def read(self, handle: Handle, offset: int, end: int) -> bytes:
        data = await self.read_view(handle, offset, end)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_view(self, handle: Handle, offset: int, end: int) -> bytes | memoryview:
        """:meth:`read`, for a caller that hands the bytes on at once and keeps nothing
        (Reader.read_view): fresh bytes of a decode come as a view of its buffer (Decode.read_view)."""
        if handle.content_fd is not None:
            return await pread(handle, offset, end)
        return await self._read_stream(handle, offset, end)

    def close(self, handle: Handle) -> None:
        if handle.decode is not None:
            self._leave(handle)
        if handle.content_fd is not None:
            self.store.release(handle.entry.hash.hex(), handle.content_fd)
            handle.content_fd = None

    async def _read_stream(self, handle: Handle, offset: int, end: int) -> bytes | memoryview:
        """Bytes [offset, end) from the file's running decode (one is started if none can serve
        them): at once if decoded, else when the decoder gets there, EIO after ``wait_s``. The read
        that reaches the end of the file waits for the verdict; a mismatch fails it (distrust)."""
        entry, integrity = handle.entry, self.integrity
        for _ in range(4):  # a restart (behind the window, a failed decode) at most a few times
            integrity.check_generation(entry, handle.generation)
            if entry.number in integrity.suspect:
                await self._wait_recheck(entry)
                continue
            dec = handle.decode
            if dec is not None and not dec.holds(offset):
                if not dec.done.is_set():
                    _behind(entry, offset)
                self._leave(handle, stop=False)  # this handle read from it: it goes on to its verdict
                dec = None
            if dec is None:
                settling = [d for d in self._decodes.get(entry.number, ()) if d.done.is_set() and not d.settled]
                if settling:  # finished, its store file not yet committed: wait, then read the store
                    with trio.move_on_after(self.config.wait_s):
                        await settling[0].settled_event.wait()
                    continue
                if entry.number in integrity.verified:  # decoded whole meanwhile: the store may have it
                    fd = await self.store.open(entry.hash.hex())
                    if fd is not None:
                        handle.content_fd, handle.stream = fd, False
                        return await trio.to_thread.run_sync(os.pread, fd, end - offset, offset)
                dec = handle.decode = await self._decode_for(entry, offset)
            dec.touch(id(handle), offset)
            try:
                with trio.move_on_after(self.config.wait_s):
                    data = await dec.read_view(offset, end, end >= entry.original_size)
                    integrity.check_generation(entry, handle.generation)  # distrusted while it waited: not served
                    return data
            except Behind:
                _behind(entry, offset)
                self._leave(handle, stop=False)  # this handle read from it: it goes on to its verdict
                continue
            raise SourceError(
                f"{show(entry.path)}: byte {end} not decoded within {self.config.wait_s:g} s (decoded up to"
                f" {dec.upto}); the decode goes on"
            )
        raise SourceError(f"{show(entry.path)}: its decode was restarted too often; not served")

    async def _decode_for(self, entry: Entry, offset: int) -> Decode:
        """The running decode that can serve `offset` (the one furthest along), or a new one: into
        a content-store temp file when it fits, else a bounded ring."""
        while self._starting.busy(entry.number):
            await self._starting.settle(entry.number)  # one decode at a time is started (its store file is one)
        running = [d for d in self._decodes.get(entry.number, ()) if not d.done.is_set() and d.holds(offset)]
        if running:
            return max(running, key=lambda d: d.upto)
        pending: Pending | None = None
        if not self._decodes.get(entry.number):  # the store file is for the first decode only
            with self._starting.lead(entry.number):
                try:
                    pending = await self.store.begin(entry.hash.hex(), entry.original_size)
                except (StoreUnavailable, LimitExceeded) as exc:
                    log.debug("%s: %s; decoding it through a bounded window", show(entry.path), exc)
        window = window_for(self.store.max_bytes)
        log.info(
            "%s: decoding it while it is read (%s)",
            show(entry.path),
            "into the content store" if pending is not None else f"through a {window}-byte window",
        )
        if pending is not None:
            dec = Decode(entry, self.source, pending.fd, window, functools.partial(ContentStore.preallocate, pending))
        else:
            dec = Decode(entry, self.source, None, window)
        if pending is not None:
            self._pending[id(dec)] = pending
        self._decodes.setdefault(entry.number, []).append(dec)
        started = self.integrity.start(self._run_decode, dec)
        assert started, "a streamed file needs the reader's nursery (Reader._strategy)"
        return dec

    async def _run_decode(self, dec: Decode) -> None:
        entry = dec.entry
        generation = self.integrity.generation_of(entry)
        started = time.monotonic()
        try:
            await dec.run(lambda d: self._decoded_stream(d, generation))
            if dec.error is None:
                log.debug("%s: decoded and verified in %.3f s", show(entry.path), time.monotonic() - started)
        finally:
            # the decode stays listed until its output is settled: a read arriving between its end
            # and the commit waits for the store file (_read_stream) instead of starting a decode
            # of its own, which could not have the store file either (its flight is not over)
            pending = self._pending.pop(id(dec), None)
            try:
                with trio.CancelScope(shield=True):
                    if pending is not None and dec.error is None:
                        try:
                            await self.store.commit(pending, dec.xxh3)
                        except BlobmountError as exc:
                            log.warning("%s: decoded and verified, but not kept: %s", show(entry.path), exc)
                    elif pending is not None:
                        await self.store.abort(pending)
                if dec.error is not None and dec.upto and entry.number not in self.integrity.verified:
                    # it served bytes and ended without a verdict: the kernel must not keep them
                    self.integrity.drop_pages(entry)
            finally:
                dec.drop_held()  # later reads go to the file (or the store)
                decodes = self._decodes.get(entry.number, [])
                if dec in decodes:
                    decodes.remove(dec)
                if not decodes:
                    self._decodes.pop(entry.number, None)
                dec.settled = True
                dec.settled_event.set()
                self._close_decode(dec)

    def _decoded_stream(self, dec: Decode, generation: int) -> None:
        """The verdict of a decode, before any reader waiting on it sees it."""
        entry, exc, integrity = dec.entry, dec.error, self.integrity
        if exc is None:
            if generation == integrity.generation_of(entry):
                integrity.hashed_ok(entry)
        elif isinstance(exc, (IntegrityError, InvalidArchive)):
            # Bytes already served were wrong: fail every handle that may hold them, drop the
            # kernel's pages, and read the file whole from the origin before serving it again.
            metrics.VERIFY_FILES.labels(result="mismatch").inc()
            log.warning("%s; the read that completes it fails (EIO); reading it again from the origin", exc)
            integrity.distrust(entry)
            integrity.start(self.recheck, entry)

    def _leave(self, handle: Handle, stop: bool = True) -> None:
        dec, handle.decode = handle.decode, None
        if dec is not None and dec.leave(id(handle)) == 0:
            if stop and not dec.done.is_set() and self.config.verify != "background":
                self.integrity.start(self._linger, dec)  # background: it goes on to its verdict
            self._close_decode(dec)

    @staticmethod
    async def _linger(dec: Decode) -> None:
        """Nobody reads the decode: it ends (its temp file goes) unless a reader comes within
        ``LINGER_S`` (programs that open, read and close, one after another, share it)."""
        await trio.sleep(LINGER_S)
        if dec.readers == 0 and not dec.done.is_set():
            log.info(
                "%s: nobody read it for %g s: its decode stops at byte %d", show(dec.entry.path), LINGER_S, dec.upto
            )
            dec.stop()

    def _close_decode(self, dec: Decode) -> None:
        """The output fd of a finished decode is closed once no handle reads from it."""
        if dec.settled and dec.readers == 0 and dec.fd is not None:
            os.close(dec.fd)
            dec.fd = None

    async def _wait_recheck(self, entry: Entry) -> None:
        integrity = self.integrity
        if not integrity.verifying.busy(entry.number) and integrity.start(self.recheck, entry):
            await trio.lowlevel.checkpoint()
        if integrity.verifying.busy(entry.number):
            with trio.move_on_after(self.config.wait_s) as waited:
                await integrity.verifying.settle(entry.number)
            if waited.cancelled_caught:
                raise SourceError(
                    f"{show(entry.path)}: being read again from the origin after a mismatch; not done within"
                    f" {self.config.wait_s:g} s"
                )
        integrity.check_poison(entry)

    async def recheck(self, entry: Entry) -> None:
        """Decode the whole file and check it before another byte is served (into the store when it
        fits, else only hashed), single-flight, through integrity's one rule: a suspect file's
        chunks are purged first so it comes from the origin, and a mismatch then poisons it."""
        integrity, number = self.integrity, entry.number
        if integrity.verifying.busy(number):
            return
        with integrity.verifying.lead(number):
            try:
                await integrity.decode_into_store(entry, or_hash=True)
            except (IntegrityError, InvalidArchive):
                pass  # poisoned: logged once, every read EIO
            except BlobmountError as exc:
                log.warning("%s: reading it again stopped: %s (the next read tries again)", show(entry.path), exc)


def _behind(entry: Entry, offset: int) -> None:
    log.info("%s: a read at byte %d is behind the decode window; decoding again", show(entry.path), offset)
