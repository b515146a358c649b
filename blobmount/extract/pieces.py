"""Phase 3's reads: the files' bytes cut into *pieces* in data-blob order (runs of neighbouring
small files share one range request, large files are cut at multiples of the piece size), and
the budget bounding the bytes read but not yet written."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from blobmount.extract.options import CopyOptions
from blobmount.extract.writer import File

MAX_PIECE_BYTES = 8 << 20  # one range read: the fetch layer's request size (~70 ms at 1 Gbit)
MIN_PIECE_BYTES = 64 << 10
BATCH_GAP_BYTES = 64 << 10  # neighbouring small files this far apart still share one read


@dataclass(frozen=True, slots=True)
class Piece:
    start: int
    end: int
    parts: tuple[tuple[File, int, int, int], ...]  # (file, start, end in blob offsets, its piece number)

    @property
    def size(self) -> int:
        return self.end - self.start


def piece_bytes(options: CopyOptions, chunk_size: int | None) -> int:
    """Pieces as large as the budget allows with every reader busy, at most one request's worth,
    whole chunks of a remote source (two pieces never split a chunk but at a file boundary)."""
    size = max(MIN_PIECE_BYTES, min(MAX_PIECE_BYTES, options.buffer_bytes // max(1, options.concurrency)))
    if chunk_size:
        size = max(chunk_size, size // chunk_size * chunk_size)
    return size


def cut_pieces(files: list[File], size: int, first: int | None = None) -> Iterator[Piece]:
    """The pieces, in data-blob order (files must be sorted by data_offset). With `first`, the
    pieces start that small and double up to `size` (multiples of the chunk size, so cuts stay on
    chunk boundaries): the first bytes are consumed while the later ones are still arriving,
    instead of waiting for a whole `size` piece on a link that delivers several at once."""
    cur = min(first or size, size)
    batch: list[tuple[File, int, int, int]] = []
    lo = hi = 0
    for f in files:
        e = f.item.entry
        start, end = e.data_offset, e.data_offset + e.data_size
        if e.data_size <= cur:
            if batch and (start < lo or start > hi + BATCH_GAP_BYTES or max(hi, end) - lo > cur):
                yield Piece(lo, hi, tuple(batch))
                cur = min(size, cur * 2)
                batch = []
            if not batch:
                lo, hi = start, end
            hi = max(hi, end)
            batch.append((f, start, end, 0))
            f.pieces = 1
            continue
        if batch:
            yield Piece(lo, hi, tuple(batch))
            cur = min(size, cur * 2)
            batch = []
        cuts = [start]  # every cut before the first piece goes out: f.pieces must be known
        grow = cur
        while cuts[-1] < end:
            cuts.append(min(end, (cuts[-1] // grow + 1) * grow))
            grow = min(size, grow * 2)
        f.pieces = len(cuts) - 1
        for number, (a, b) in enumerate(itertools.pairwise(cuts)):
            yield Piece(a, b, ((f, a, b, number),))
        cur = grow
    if batch:
        yield Piece(lo, hi, tuple(batch))


class Budget:
    """Bytes of fetched data held in memory. Acquired in piece order (under the take lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = trio.Event()

    async def acquire(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            await self._changed.wait()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._changed.set()
        self._changed = trio.Event()
