"""Compressed bytes for a zstd decoder on a worker thread: a file-like window over a source.

Why a module of its own: the decoder (decode.py) is synchronous and runs on a worker thread, the
fetcher is async and lives on the trio thread. Each read the decoder makes hops back to the trio
thread for the bytes (``trio.from_thread.run``; a local file is read directly:
:class:`~blobmount.source.SyncRangeSource`). The hop runs in the context of the task that started
the decoder's thread, on purpose: that task's cancellation (a request's deadline, fs.py) reaches
the read under way, so a stalled fetch never outlives the request that waits for it. A stop of a
shared decode (decode.py) cancels the source read under way too.

Concurrency: ``readinto`` runs on the decoder's thread; everything it awaits runs on the trio thread.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import trio

from blobmount.errors import SourceError
from blobmount.index.paths import show
from blobmount.readahead import ReadHint
from blobmount.sources.base import RangeSource, SyncRangeSource

if TYPE_CHECKING:
    from blobmount.decode import Decode

INPUT_FIRST_BYTES = 1 << 20  # the first hop's (doubling): the first bytes come after 1 MiB of frame
INPUT_FAST_S = 0.25  # a hop that took longer (a slow link) sends the next one back to the first size,
# so one read never asks a slow link for more than it delivers well within --timeout


class Stopped(SourceError):
    """The decode was stopped (its last reader left, or the mount is going away)."""


class RangeStream(io.RawIOBase):
    """A file-like window [start, end) over a source, for the zstd decoder on a worker thread."""

    def __init__(
        self,
        source: RangeSource,
        start: int,
        end: int,
        decode: Decode | None = None,
        keep: bool = True,
    ) -> None:
        """`decode`: its :meth:`Decode.stop` also cancels a read under way (a stalled fetch must
        not keep a decode nobody reads alive). `keep=False`: the compressed bytes are not written
        to the chunk cache (ReadHint.keep): the decoded file goes to the content store, and a
        second copy, compressed, would cost a write per byte and never be read."""
        self._source = source
        self._pos = start
        self._end = end
        self._hint = ReadHint(start, end, keep=keep)
        self._decode = decode
        self._ask = INPUT_FIRST_BYTES  # per hop: doubles up to what the decoder asks (INPUT_BYTES)
        # while hops are fast: fewer hops, each a wait for the trio thread (22 % of the decoder's
        # time in a profile of a cold 2 GiB read at 1 MiB per hop)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._end - self._pos, self._ask)
        if n <= 0:
            return 0
        if isinstance(self._source, SyncRangeSource):
            data = self._source.read_range_sync(self._pos, self._pos + n)
        else:
            data, took = trio.from_thread.run(self._timed_read, self._pos, self._pos + n)
            self._ask = min(self._ask * 2, len(b)) if took < INPUT_FAST_S else INPUT_FIRST_BYTES
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    async def _timed_read(self, start: int, end: int) -> tuple[bytes, float]:
        """The bytes, and how long the source took (trio's clock)."""
        started = trio.current_time()
        data = await self._read(start, end)
        return data, trio.current_time() - started

    async def _read(self, start: int, end: int) -> bytes:
        decode = self._decode
        if decode is None:
            return await self._source.read_range(start, end, self._hint)
        try:
            with trio.CancelScope() as scope:
                decode.reading = scope
                if not decode.stopped:
                    return await self._source.read_range(start, end, self._hint)
        finally:
            decode.reading = None
        raise Stopped(f"{show(decode.entry.path)}: decode stopped: no reader left")
