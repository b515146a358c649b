"""Phase 3 of a copy, the pipeline: pieces read through the archive's own source (a remote
archive's chunk cache: the same cache directory, chunks and single flight as a mount), up to
``concurrency`` at once, the bytes read but not yet written bounded by ``buffer_bytes``; each
piece handed to the :class:`~.writer.FileWriter`, on a worker thread when there is enough of it.

Pieces are taken and charged to the budget in order, and a file's pieces are consumed in order,
so memory stays bounded for any file size and the pipeline cannot deadlock: the oldest piece
never waits for a younger one. The trio thread receives; pieces are consumed on one worker
thread at a time (CONSUMER_THREADS). Files that fail verification from a remote source have
their chunks dropped and are read once more from the origin.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable

import trio

from blobmount.errors import BlobmountError, DestinationError, IntegrityError
from blobmount.extract.dest import Dest, check_clean_dest
from blobmount.extract.options import CopyOptions, CopyResult
from blobmount.extract.pieces import Budget, Piece, cut_pieces, piece_bytes
from blobmount.extract.plan import Item, directory_mtime_ns
from blobmount.extract.writer import File, FileWriter
from blobmount.index.paths import show
from blobmount.progress import ProgressLine
from blobmount.sources.base import Fetching, RangeSource

log = logging.getLogger(__name__)

THREAD_MIN_BYTES = 256 << 10  # consuming (hash, decode, write) this much goes to a worker thread
CONSUMER_THREADS = 1  # worker threads consuming at once: each syscall of one hands the GIL to another,
# and four (one per reader) spent 2 s of system time in futex on the bench tree; one thread beside the
# trio thread (which receives) was as fast as two on the 2-core bench machine, with the least CPU


class Copier:
    """Reads the pieces of a list of files and hands them to one FileWriter."""

    def __init__(self, source: RangeSource, writer: FileWriter, options: CopyOptions) -> None:
        self.source = source
        self.writer = writer
        self.options = options
        self.remote = source if isinstance(source, Fetching) else None
        chunk = self.remote.store.chunk_size if self.remote is not None else None
        self.piece_bytes = piece_bytes(options, chunk)
        self.budget = Budget(max(options.buffer_bytes, self.piece_bytes))
        self._threads = trio.CapacityLimiter(CONSUMER_THREADS)

    async def run(self, items: list[Item]) -> None:
        files = [File(item) for item in sorted(items, key=lambda i: (i.entry.data_offset, i.rel))]
        pieces = cut_pieces(files, self.piece_bytes, self.remote.store.chunk_size if self.remote is not None else None)
        take = trio.Lock()

        async def worker() -> None:
            while True:
                async with take:  # pieces are taken, and charged to the budget, in order
                    piece = next(pieces, None)
                    if piece is None:
                        return
                    await self.budget.acquire(piece.size)
                try:
                    await self.piece(piece)
                finally:
                    self.budget.release(piece.size)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(max(1, self.options.concurrency)):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def piece(self, piece: Piece) -> None:
        try:
            data = await self.source.read_range(piece.start, piece.end) if piece.size else b""
        except BlobmountError as exc:
            first = piece.parts[0][0].item.entry.path
            more = f" (and {len(piece.parts) - 1} more files in the same read)" if len(piece.parts) > 1 else ""
            raise type(exc)(f"{show(first)}{more}: {exc}") from exc
        view = memoryview(data)
        # Decoding, hashing and writing run on a worker thread when there is enough of it: the
        # decoder, the hash and the write release the GIL, so the second core works while this
        # thread receives the next pieces.
        threaded = piece.size >= THREAD_MIN_BYTES or self.options.fsync
        if len(piece.parts) > 1 or piece.parts[0][0].pieces == 1:  # every file whole, in this piece only
            if threaded:
                await trio.to_thread.run_sync(self.writer.batch, piece, view, limiter=self._threads)
            else:
                self.writer.batch(piece, view)
            return
        f, a, b, number = piece.parts[0]
        while f.fed != number:  # a younger piece of a large file read first waits for its turn
            if f.turn is None:
                f.turn = trio.Event()
            await f.turn.wait()
        try:
            if threaded:
                await trio.to_thread.run_sync(
                    self.writer.feed, f, view[a - piece.start : b - piece.start], limiter=self._threads
                )
            else:
                self.writer.feed(f, view[a - piece.start : b - piece.start])
        finally:
            if f.turn is not None:
                f.turn.set()
                f.turn = None


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a failed pipeline: the first of ours (the others are the
    cancellations it caused), else the group as it is."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    ours = [e for e in leaves if isinstance(e, BlobmountError)]
    if ours:
        return ours[0]
    others = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return others[0] if len(others) == 1 else group


async def copy_items(
    source: RangeSource,
    items: list[Item],
    dest: bytes,
    options: CopyOptions,
    *,
    cache_dir: bytes | None = None,
    created_ns: int | None = None,
) -> CopyResult:
    """Write `items` below `dest` (module docstring). Raises IntegrityError (after the other files
    are written) when a file's bytes do not verify, DestinationError for anything in DEST."""
    if options.clean_dest:
        check_clean_dest(dest, cache_dir)
    d = Dest(dest)
    try:
        if options.clean_dest:
            d.empty()
        dirs = sorted(_ancestors(i.rel for i in items))
        for rel in dirs:
            d.dir_fd(rel, create=True)
        todo: list[Item] = []
        skipped = 0
        for item in items:
            if not options.overwrite and d.exists(item.rel):
                skipped += 1
            else:
                if options.overwrite:
                    d.exists(item.rel)  # a directory in the way is refused before any fetch
                todo.append(item)
        show_progress = sys.stderr.isatty() if options.progress is None else options.progress
        progress = ProgressLine("cp", sum(i.entry.original_size for i in todo), enabled=show_progress, files=len(todo))
        writer = FileWriter(d, options, progress)
        writer.result.skipped = skipped
        copier = Copier(source, writer, options)
        try:
            await copier.run(todo)
            retry = [f.item for f in writer.mismatched]
            if retry and copier.remote is not None:
                for f in writer.mismatched:
                    log.warning("%s; reading it again from the origin", f.failed)
                    e = f.item.entry
                    await copier.remote.purge(e.data_offset, e.data_offset + e.data_size)
                writer.mismatched = []
                writer.result.retried = len(retry)
                await copier.run(retry)
            if writer.mismatched:
                first = writer.mismatched[0].failed
                more = len(writer.mismatched) - 1
                raise IntegrityError(f"{first}" + (f" (and {more} more files failed verification)" if more else ""))
        finally:
            writer.cleanup()
            progress.close()
        if options.preserve_times:
            _set_dir_times(d, items, dirs, created_ns)
        return writer.result
    finally:
        d.close()


def _ancestors(rels: Iterable[bytes]) -> set[bytes]:
    """Every directory below DEST that the files need, intermediate ones included (a directory
    holding only directories gets its time too)."""
    out: set[bytes] = set()
    for rel in rels:
        parent = rel.rpartition(b"/")[0]
        while parent and parent not in out:
            out.add(parent)
            parent = parent.rpartition(b"/")[0]
    return out


def _set_dir_times(d: Dest, items: list[Item], dirs: list[bytes], created_ns: int | None) -> None:
    """Directories' times, deepest first (setting a child's time does not touch its parent)."""
    direct: dict[bytes, list[int]] = {}
    for item in items:
        direct.setdefault(item.rel.rpartition(b"/")[0], []).append(item.entry.mtime_ns)
    for rel in sorted(dirs, key=lambda r: -r.count(b"/")):
        when = directory_mtime_ns(direct.get(rel, ()), created_ns)
        if when is None:
            continue
        parent_rel, _, name = rel.rpartition(b"/")
        try:
            os.utime(name, ns=(when, when), dir_fd=d.dir_fd(parent_rel), follow_symlinks=False)
        except OSError as exc:
            raise DestinationError(f"{d.show(rel)}: cannot set its time: {exc.strerror}") from exc
