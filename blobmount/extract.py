"""`blobmount cp`: files of an archive written into a local directory, verified, without a mount.

Three phases, so that a bad request changes nothing on disk:

1. :func:`plan` turns the PATH arguments into (entry, path below DEST) pairs. A PATH the archive
   does not have is NotFound, an entry that breaks the format (a hostile path, a file that is also
   a directory) is InvalidArchive -- both before DEST is touched.
2. :class:`_Dest` prepares DEST: emptied first with ``--clean-dest`` (never ``/``, an ancestor of
   the working directory, or anything overlapping the cache directory), then every directory is
   created and opened one component at a time from DEST's descriptor with ``O_NOFOLLOW``: a
   symbolic link (or a file) in the way is an error, never followed, so nothing is written
   outside DEST whatever the archive's paths or DEST's contents. Files already present are
   skipped (``--overwrite`` replaces them).
3. :func:`copy_items` reads the files' bytes in data-blob order, as *pieces*: runs of neighbouring
   small files read with one range request, large files cut at multiples of the piece size. Up to
   ``concurrency`` pieces are read at once, through the archive's own source (a remote archive's
   chunk cache: the same cache directory, chunks and single flight as a mount), and the bytes
   read but not yet written are bounded by ``buffer_bytes``. Pieces are taken and charged to the
   budget in order, and a file's pieces are consumed in order (hashed, or fed to a streaming zstd
   decoder whose output is bounded by the entry's size), so memory stays bounded for any file
   size and the pipeline cannot deadlock: the oldest piece never waits for a younger one. The
   trio thread receives; pieces are consumed on one worker thread at a time (CONSUMER_THREADS).

Every file is written to a temporary name in its own directory, checked against its sha256 and
size, given its mode and times, and only then renamed to its name: a failure never leaves a partial
file under a final name. A file that fails verification from a remote source has its chunks dropped
and is read once more from the origin (as the reader does: a fault on the way must not fail it);
a second mismatch is an IntegrityError (exit 5) naming the file, after the other files are done.
No fsync unless asked (``fsync=True``): like tar and cp, the page cache decides when bytes reach
the disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import secrets
import shutil
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import trio
import zstandard

from blobmount import defaults
from blobmount.errors import (
    BlobmountError,
    DestinationError,
    IntegrityError,
    InvalidArchive,
    NotFound,
    UsageError,
)
from blobmount.index import COMPRESSION_ZSTD, Entry, IndexView
from blobmount.index.paths import show
from blobmount.progress import ProgressLine
from blobmount.sources.base import Fetching, RangeSource

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = defaults.CP_CONCURRENCY
DEFAULT_BUFFER_BYTES = defaults.CP_BUFFER_BYTES  # fetched bytes held in memory before they are written
MAX_PIECE_BYTES = 8 << 20  # one range read: the fetch layer's request size (~70 ms at 1 Gbit)
MIN_PIECE_BYTES = 64 << 10
BATCH_GAP_BYTES = 64 << 10  # neighbouring small files this far apart still share one read
THREAD_MIN_BYTES = 256 << 10  # consuming (hash, decode, write) this much goes to a worker thread
CONSUMER_THREADS = 1  # worker threads consuming at once: each syscall of one hands the GIL to another,
# and four (one per reader) spent 2 s of system time in futex on the bench tree; one thread beside the
# trio thread (which receives) was as fast as two on the 2-core bench machine, with the least CPU
DECODE_BLOCK_BYTES = 1 << 20  # the streaming decoder's output unit: its memory bound
SMALL_DECODE_BYTES = 1 << 20  # zstd files up to this size are decoded in one call (bounded output)
DIR_FDS = 128  # directory descriptors kept open (LRU); more are reopened from DEST
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_TMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class CopyOptions:
    concurrency: int = DEFAULT_CONCURRENCY
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    overwrite: bool = False
    preserve_mode: bool = False
    preserve_times: bool = False
    fsync: bool = False
    clean_dest: bool = False
    progress: bool | None = None  # None: on a terminal


@dataclass(frozen=True, slots=True)
class Item:
    """One file to write: its entry and its path below DEST."""

    entry: Entry
    rel: bytes


@dataclass(slots=True)
class CopyResult:
    files: int = 0  # written
    skipped: int = 0  # already present (no --overwrite)
    bytes: int = 0  # content bytes written
    retried: int = 0  # files read a second time after a mismatch


# -- 1. the plan ---------------------------------------------------------------------------------


def plan(view: IndexView, paths: Sequence[bytes], on_span: Callable[[int, int], None] | None = None) -> list[Item]:
    """The files PATHs name: a file lands at its archive path, a directory's files (one directory,
    alone; ``.`` or ``/`` is the whole archive) at their path below it. Raises NotFound,
    InvalidArchive or UsageError; touches nothing on disk.

    `on_span(start, end)` is told the data-blob range of a directory once the directory is known
    to be there, before its entries are validated one by one (a remote copy starts fetching it:
    validating a 25,000-entry tree takes as long as fetching 20 MB at 1 Gbit). Never called for
    a PATH that is not in the archive."""
    cleaned = [_clean(p) for p in paths]
    items: list[Item] = []
    for path in dict.fromkeys(cleaned):
        found = view.kind(path)
        if found is None:
            raise NotFound(f"{show(path)}: no such file or directory in the archive")
        if found >= 0:
            parts = path.split(b"/")
            for depth in range(1, len(parts)):
                view.kind(b"/".join(parts[:depth]))  # a file that is also this directory: refused
            items.append(Item(view.entry(found), view.entry(found).path))
            continue
        if len(cleaned) > 1:
            raise UsageError(
                f"{show(path) if path else '.'}: a directory; copy one directory alone (cp SOURCE DIR DEST)"
            )
        prefix = path + b"/" if path else b""
        span = view.data_span(path) if on_span is not None else None
        if span is not None and on_span is not None:
            on_span(*span)
        for entry in _entries_under(view, prefix):
            items.append(Item(entry, entry.path[len(prefix) :]))
    seen: set[bytes] = set()
    for item in items:
        if item.rel in seen:
            raise InvalidArchive(f"entry {item.entry.number}: path {show(item.entry.path)} is stored twice")
        seen.add(item.rel)
    return items


def _clean(path: bytes) -> bytes:
    path = path.strip(b"/")
    while path.startswith(b"./"):
        path = path[2:]
    return b"" if path == b"." else path


def _entries_under(view: IndexView, prefix: bytes) -> Iterator[Entry]:
    """Every entry below `prefix`, each validated: the first that breaks the format stops the
    copy with its InvalidArchive (a mount skips such an entry; a copy must be complete)."""
    if not prefix:
        yield from view.entries()
        return
    for number in range(len(view)):
        if view.path(number).startswith(prefix):
            yield view.entry(number)


def directory_mtime_ns(file_mtimes_ns: Iterable[int], created_ns: int | None) -> int | None:
    """A directory's time, as the mount presents it: the newest mtime of the files directly in
    it, else the archive's creation time (None when neither is known: the time is left alone)."""
    newest = max(file_mtimes_ns, default=None)
    return newest if newest is not None else created_ns


# -- 2. the destination --------------------------------------------------------------------------


def check_clean_dest(dest: bytes, cache_dir: bytes | None) -> None:
    """Refuse to empty `/`, the working directory or any of its ancestors, and any directory
    overlapping the cache directory (it, inside it, or holding it)."""
    real = os.path.realpath(dest)
    here = os.path.realpath(os.getcwd().encode())
    if real == b"/":
        raise UsageError("--clean-dest: refusing to empty /")
    if _within(here, real):
        raise UsageError(f"--clean-dest: refusing to empty {os.fsdecode(dest)!r}: it holds the current directory")
    if cache_dir is not None:
        cache = os.path.realpath(cache_dir)
        if _within(cache, real) or _within(real, cache):
            raise UsageError(f"--clean-dest: refusing to empty {os.fsdecode(dest)!r}: it overlaps the cache directory")


def _within(path: bytes, directory: bytes) -> bool:
    return path == directory or path.startswith(directory.rstrip(b"/") + b"/")


class _Dest:
    """DEST and the directories below it, opened component by component with O_NOFOLLOW."""

    def __init__(self, dest: bytes) -> None:
        self.dest = dest
        try:
            os.makedirs(dest, exist_ok=True)
            self.root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise DestinationError(f"{os.fsdecode(dest)}: {exc.strerror}") from exc
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self._pins: dict[bytes, int] = {}
        self._fresh: set[bytes] = set()  # directories this copy created: nothing was in them
        self._names: dict[bytes, frozenset[bytes]] = {}  # what the others held when first looked at
        self._lock = threading.RLock()  # worker threads open and rename files too

    def show(self, rel: bytes) -> str:
        return show(os.path.join(self.dest, rel) if rel else self.dest, limit=240)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.root)

    def empty(self) -> None:
        """Remove everything in DEST (symbolic links are removed, never followed)."""
        for name in map(os.fsencode, os.listdir(self.root)):  # str names (surrogateescape) from an fd
            try:
                st = os.stat(name, dir_fd=self.root, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=self.root)
                else:
                    os.unlink(name, dir_fd=self.root)
            except OSError as exc:
                raise DestinationError(f"--clean-dest: {self.show(name)}: {exc.strerror}") from exc

    def dir_fd(self, rel: bytes, create: bool = False) -> int:
        """The descriptor of directory DEST/`rel`, creating it (and its parents) when asked. Only
        for the single-threaded set-up; the copy itself holds descriptors through :meth:`pin`."""
        with self._lock:
            return self._open(rel, create)

    def pin(self, rel: bytes) -> int:
        """DEST/`rel`'s descriptor, never closed by the LRU until as many :meth:`unpin` calls (on
        whichever thread: a file's directory from its temporary's creation to its rename)."""
        with self._lock:
            fd = self._open(rel, False)
            self._pins[rel] = self._pins.get(rel, 0) + 1
            return fd

    def unpin(self, rel: bytes) -> None:
        with self._lock:
            left = self._pins.pop(rel) - 1
            if left:
                self._pins[rel] = left
            self._evict()

    def _open(self, rel: bytes, create: bool) -> int:
        if not rel:
            return self.root
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        parent_rel, _, name = rel.rpartition(b"/")
        parent = self._open(parent_rel, create)
        if create:
            try:
                os.mkdir(name, 0o777, dir_fd=parent)
                self._fresh.add(rel)
            except FileExistsError:
                pass
            except OSError as exc:
                raise DestinationError(f"{self.show(rel)}: cannot create the directory: {exc.strerror}") from exc
        try:
            fd = os.open(name, _O_DIR, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                what = "a symbolic link" if _is_link(name, parent) else "not a directory"
                raise DestinationError(f"{self.show(rel)}: {what} in the way; cp never follows or replaces it") from exc
            raise DestinationError(f"{self.show(rel)}: {exc.strerror}") from exc
        self._fds[rel] = fd
        self._evict()
        return fd

    def _evict(self) -> None:
        """Close the least recently used descriptors over DIR_FDS that nobody holds."""
        if len(self._fds) <= DIR_FDS:
            return
        for old in list(self._fds):
            if len(self._fds) <= DIR_FDS:
                return
            if old not in self._pins:
                os.close(self._fds.pop(old))

    def exists(self, rel: bytes) -> bool:
        """Whether DEST/`rel` is there (a directory in the way is an error). A directory this copy
        created holds nothing of before; any other is listed once, so only the names it holds cost
        a stat (not one stat per file of the archive)."""
        parent_rel, _, name = rel.rpartition(b"/")
        if parent_rel in self._fresh:
            return False
        names = self._names.get(parent_rel)
        if names is None:
            try:
                names = frozenset(map(os.fsencode, os.listdir(self.dir_fd(parent_rel))))
            except OSError as exc:
                raise DestinationError(f"{self.show(parent_rel)}: {exc.strerror}") from exc
            self._names[parent_rel] = names
        if name not in names:
            return False
        try:
            st = os.stat(name, dir_fd=self.dir_fd(parent_rel), follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise DestinationError(f"{self.show(rel)}: {exc.strerror}") from exc
        if stat.S_ISDIR(st.st_mode):
            raise DestinationError(f"{self.show(rel)}: a directory is in the way of this file")
        return True


def _is_link(name: bytes, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


# -- 3. the copy ---------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _File:
    """One file being written. Built for every file of the copy, so what only a file of several
    pieces needs (its turn) is made when it is needed; a file's directory descriptor is pinned
    from its temporary's creation to its rename (or removal)."""

    item: Item
    pieces: int = 0  # how many pieces carry its bytes
    fed: int = 0  # pieces consumed so far (they are consumed in order)
    turn: trio.Event | None = None  # set when a piece of it was consumed (files of several pieces)
    fd: int = -1
    tmp: bytes = b""
    parent: int = -1  # its directory's descriptor, pinned while the temporary exists
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    written: int = 0
    decoder: zstandard.ZstdDecompressionWriter | None = None
    failed: BlobmountError | None = None


@dataclass(frozen=True, slots=True)
class _Piece:
    start: int
    end: int
    parts: tuple[tuple[_File, int, int, int], ...]  # (file, start, end in blob offsets, its piece number)

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


def _pieces(files: list[_File], size: int, first: int | None = None) -> Iterator[_Piece]:
    """The pieces, in data-blob order (files must be sorted by data_offset). With `first`, the
    pieces start that small and double up to `size` (multiples of the chunk size, so cuts stay on
    chunk boundaries): the first bytes are consumed while the later ones are still arriving,
    instead of waiting for a whole `size` piece on a link that delivers several at once."""
    cur = min(first or size, size)
    batch: list[tuple[_File, int, int, int]] = []
    lo = hi = 0
    for f in files:
        e = f.item.entry
        start, end = e.data_offset, e.data_offset + e.data_size
        if e.data_size <= cur:
            if batch and (start < lo or start > hi + BATCH_GAP_BYTES or max(hi, end) - lo > cur):
                yield _Piece(lo, hi, tuple(batch))
                cur = min(size, cur * 2)
                batch = []
            if not batch:
                lo, hi = start, end
            hi = max(hi, end)
            batch.append((f, start, end, 0))
            f.pieces = 1
            continue
        if batch:
            yield _Piece(lo, hi, tuple(batch))
            cur = min(size, cur * 2)
            batch = []
        cuts = [start]  # every cut before the first piece goes out: f.pieces must be known
        grow = cur
        while cuts[-1] < end:
            cuts.append(min(end, (cuts[-1] // grow + 1) * grow))
            grow = min(size, grow * 2)
        f.pieces = len(cuts) - 1
        for number, (a, b) in enumerate(itertools.pairwise(cuts)):
            yield _Piece(a, b, ((f, a, b, number),))
        cur = grow
    if batch:
        yield _Piece(lo, hi, tuple(batch))


class _Budget:
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


class _Copier:
    def __init__(self, source: RangeSource, dest: _Dest, options: CopyOptions, progress: ProgressLine) -> None:
        self.source = source
        self.dest = dest
        self.options = options
        self.progress = progress
        self.remote = source if isinstance(source, Fetching) else None
        chunk = self.remote.store.chunk_size if self.remote is not None else None
        self.piece_bytes = piece_bytes(options, chunk)
        self.budget = _Budget(max(options.buffer_bytes, self.piece_bytes))
        umask = os.umask(0)
        os.umask(umask)
        self.file_mode = 0o666 & ~umask
        self.result = CopyResult()
        # temporary names: one random part per copy, a counter per file (no getrandom per file;
        # O_EXCL still refuses a name that is taken, and the next number is tried)
        self._tmp_prefix = b".blobmount-cp." + secrets.token_hex(6).encode() + b"."
        self._tmp_numbers = itertools.count()  # next() is atomic under the GIL: threads share it
        self._local = threading.local()  # a zstd decompression context per thread, reused
        self._threads = trio.CapacityLimiter(CONSUMER_THREADS)
        self.temps: dict[_File, None] = {}  # open temporaries, removed if the copy fails
        self._counting = threading.Lock()  # files finish on worker threads too
        self.mismatched: list[_File] = []

    async def run(self, items: list[Item]) -> None:
        files = [_File(item) for item in sorted(items, key=lambda i: (i.entry.data_offset, i.rel))]
        pieces = _pieces(files, self.piece_bytes, self.remote.store.chunk_size if self.remote is not None else None)
        take = trio.Lock()

        async def worker() -> None:
            while True:
                async with take:  # pieces are taken, and charged to the budget, in order
                    piece = next(pieces, None)
                    if piece is None:
                        return
                    await self.budget.acquire(piece.size)
                try:
                    await self._piece(piece)
                finally:
                    self.budget.release(piece.size)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(max(1, self.options.concurrency)):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def _piece(self, piece: _Piece) -> None:
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
                await trio.to_thread.run_sync(self._batch, piece, view, limiter=self._threads)
            else:
                self._batch(piece, view)
            return
        f, a, b, number = piece.parts[0]
        while f.fed != number:  # a younger piece of a large file read first waits for its turn
            if f.turn is None:
                f.turn = trio.Event()
            await f.turn.wait()
        try:
            if threaded:
                await trio.to_thread.run_sync(
                    self._feed, f, view[a - piece.start : b - piece.start], limiter=self._threads
                )
            else:
                self._feed(f, view[a - piece.start : b - piece.start])
        finally:
            if f.turn is not None:
                f.turn.set()
                f.turn = None

    def _batch(self, piece: _Piece, view: memoryview) -> None:
        """Files each whole in this piece. A directory's files are neighbours in the data blob, so
        its descriptor is pinned once for the run of them, not per file."""
        pinned: bytes | None = None
        parent = -1
        try:
            for f, a, b, _ in piece.parts:
                rel = f.item.rel.rpartition(b"/")[0]
                if rel != pinned:
                    if pinned is not None:
                        self.dest.unpin(pinned)
                        pinned = None
                    parent = self.dest.pin(rel)
                    pinned = rel
                e = f.item.entry
                if e.compression == COMPRESSION_ZSTD and e.original_size > SMALL_DECODE_BYTES:
                    self._feed(f, view[a - piece.start : b - piece.start])  # decoded as a stream
                else:
                    self._whole(f, view[a - piece.start : b - piece.start], parent)
        finally:
            if pinned is not None:
                self.dest.unpin(pinned)

    def _whole(self, f: _File, data: memoryview, parent: int) -> None:
        """A file whose stored bytes are all in `data`: decoded and verified in memory (at most
        one piece, or SMALL_DECODE_BYTES decoded), then written to a temporary, renamed into place. Nothing is
        created for a file that fails verification. On the trio thread or the worker thread."""
        e = f.item.entry
        f.fed = 1
        out: memoryview | bytes = data
        try:
            if e.compression == COMPRESSION_ZSTD and e.original_size:
                out = self._dctx().decompress(data, max_output_size=e.original_size)
        except zstandard.ZstdError as exc:
            f.failed = IntegrityError(f"{show(e.path)}: corrupt zstd frame (expected sha256 {e.hash.hex()}): {exc}")
        else:
            if e.compression == COMPRESSION_ZSTD and not e.original_size:
                out = b""
            if len(out) != e.original_size:
                f.failed = IntegrityError(f"{show(e.path)}: has {len(out)} bytes, original_size is {e.original_size}")
            else:
                digest = hashlib.sha256(out).digest()
                if digest != e.hash:
                    f.failed = IntegrityError(
                        f"{show(e.path)}: sha256 mismatch: expected {e.hash.hex()}, got {digest.hex()}"
                    )
        if f.failed is not None:
            self.mismatched.append(f)
            return
        tmp = self._create(f, parent, 0o600 if self.options.preserve_mode else self.file_mode)
        try:
            view = memoryview(out)
            while view:
                view = view[os.write(f.fd, view) :]
            if self.options.preserve_mode:
                os.fchmod(f.fd, e.mode & 0o777)
            if self.options.preserve_times:
                os.utime(f.fd, ns=(e.mtime_ns, e.mtime_ns))
            if self.options.fsync:
                os.fsync(f.fd)
            os.close(f.fd)
            f.fd = -1
            os.rename(tmp, f.item.rel.rpartition(b"/")[2], src_dir_fd=parent, dst_dir_fd=parent)
        except OSError as exc:
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            raise DestinationError(f"{self.dest.show(f.item.rel)}: {exc.strerror}") from exc
        with self._counting:
            self.result.files += 1
            self.result.bytes += e.original_size
            self.progress.advance(e.original_size, files=1)

    def _create(self, f: _File, parent: int, mode: int) -> bytes:
        """A new temporary for `f` in directory `parent` (its descriptor in f.fd); its name."""
        for _ in range(8):  # bounded: only a name left by another copy with the same random part
            tmp = self._tmp_prefix + str(next(self._tmp_numbers)).encode()
            try:
                f.fd = os.open(tmp, _O_TMP, mode, dir_fd=parent)
                return tmp
            except FileExistsError:
                continue
            except OSError as exc:
                raise DestinationError(f"{self.dest.show(f.item.rel)}: cannot create it: {exc.strerror}") from exc
        raise DestinationError(f"{self.dest.show(f.item.rel)}: no free temporary name")  # pragma: no cover

    def _feed(self, f: _File, data: memoryview) -> None:
        """The next piece of `f`: decoded, hashed, written; the file finished after its last. On
        the trio thread or a worker thread (it touches only `f`, DEST through pinned
        descriptors, and the counters)."""
        try:
            if f.failed is None:
                if f.fd < 0:
                    self._open_temp(f)
                self._consume(f, data)
        except (IntegrityError, InvalidArchive) as exc:
            f.failed = exc
        finally:
            f.fed += 1
        if f.fed == f.pieces:
            self._finish(f)

    def _open_temp(self, f: _File) -> None:
        """The file's temporary in its directory (pinned until the rename). Created with its
        final mode when that is the umask's (the common case: no fchmod per file); with
        --preserve-mode it stays 0600 until it is verified and given the archive's mode."""
        parent_rel = f.item.rel.rpartition(b"/")[0]
        parent = self.dest.pin(parent_rel)
        try:
            f.tmp = self._create(f, parent, 0o600 if self.options.preserve_mode else self.file_mode)
        except DestinationError:
            self.dest.unpin(parent_rel)
            raise
        f.parent = parent
        self.temps[f] = None
        e = f.item.entry
        # one call decodes a whole frame only: a file cut into pieces streams, whatever its size
        if e.compression == COMPRESSION_ZSTD and (e.original_size > SMALL_DECODE_BYTES or f.pieces > 1):
            sink = _Sink(self, f)
            f.decoder = zstandard.ZstdDecompressor().stream_writer(
                sink,  # type: ignore[arg-type]  # any object with write() will do
                write_size=DECODE_BLOCK_BYTES,
                closefd=False,
            )

    def _consume(self, f: _File, data: memoryview) -> None:
        """Hash (and decode) bytes of `f` and write them to its temporary file; may run on a
        worker thread (it touches only `f` and its descriptor)."""
        e = f.item.entry
        if e.compression != COMPRESSION_ZSTD:
            self._write(f, data)
            return
        try:
            if f.decoder is not None:
                f.decoder.write(data)
            elif e.original_size:
                decoded = self._dctx().decompress(data, max_output_size=e.original_size)
                self._write(f, memoryview(decoded))
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{show(e.path)}: corrupt zstd frame (expected sha256 {e.hash.hex()}): {exc}") from exc

    def _dctx(self) -> zstandard.ZstdDecompressor:
        """This thread's decompressor: making one per file cost as much as the decoding itself
        (a context of its own each time); one object must not be used by two threads at once."""
        dctx: zstandard.ZstdDecompressor | None = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    def _write(self, f: _File, data: memoryview) -> None:
        e = f.item.entry
        if f.written + len(data) > e.original_size:
            raise IntegrityError(f"{show(e.path)}: decodes past its original_size {e.original_size}; refused")
        f.hasher.update(data)
        f.written += len(data)
        while data:
            try:
                n = os.write(f.fd, data)
            except OSError as exc:
                raise DestinationError(f"{self.dest.show(f.item.rel)}: write failed: {exc.strerror}") from exc
            data = data[n:]

    def _finish(self, f: _File) -> None:
        e = f.item.entry
        if f.failed is None and f.fd < 0:
            self._open_temp(f)  # an empty file: no piece had bytes for it
        if f.failed is None and f.decoder is not None:
            try:
                f.decoder.flush()  # type: ignore[no-untyped-call]
            except zstandard.ZstdError as exc:
                f.failed = IntegrityError(f"{show(e.path)}: corrupt zstd frame: {exc}")
        if f.failed is None and f.written != e.original_size:
            f.failed = IntegrityError(f"{show(e.path)}: has {f.written} bytes, original_size is {e.original_size}")
        if f.failed is None and f.hasher.digest() != e.hash:
            f.failed = IntegrityError(
                f"{show(e.path)}: sha256 mismatch: expected {e.hash.hex()}, got {f.hasher.hexdigest()}"
            )
        if f.failed is not None:
            self._discard(f)
            self.mismatched.append(f)
            return
        rel = f.item.rel
        try:
            if self.options.preserve_mode:
                os.fchmod(f.fd, e.mode & 0o777)
            if self.options.preserve_times:
                os.utime(f.fd, ns=(e.mtime_ns, e.mtime_ns))
            if self.options.fsync:
                os.fsync(f.fd)  # on a worker thread (see _piece)
            os.close(f.fd)
            f.fd = -1
            os.rename(f.tmp, rel.rpartition(b"/")[2], src_dir_fd=f.parent, dst_dir_fd=f.parent)
        except OSError as exc:
            self._discard(f)
            raise DestinationError(f"{self.dest.show(rel)}: {exc.strerror}") from exc
        self.temps.pop(f, None)
        self._unpin(f)
        with self._counting:
            self.result.files += 1
            self.result.bytes += e.original_size
            self.progress.advance(e.original_size, files=1)

    def _discard(self, f: _File) -> None:
        """Close and remove a file's temporary (a failure leaves nothing behind)."""
        if f.fd >= 0:
            os.close(f.fd)
            f.fd = -1
        if f.tmp and f in self.temps:
            try:
                os.unlink(f.tmp, dir_fd=f.parent)
            except OSError as exc:
                log.warning("%s: could not remove %s: %s", self.dest.show(f.item.rel), f.tmp, exc)
        self.temps.pop(f, None)
        self._unpin(f)

    def _unpin(self, f: _File) -> None:
        if f.parent >= 0:
            f.parent = -1
            self.dest.unpin(f.item.rel.rpartition(b"/")[0])

    def cleanup(self) -> None:
        for f in list(self.temps):
            self._discard(f)


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


class _Sink:
    """The streaming decoder's output: bounded by the entry's size, hashed, written."""

    def __init__(self, copier: _Copier, f: _File) -> None:
        self.copier, self.f = copier, f

    def write(self, data: bytes) -> int:
        self.copier._write(self.f, memoryview(data))
        return len(data)


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
    d = _Dest(dest)
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
        copier = _Copier(source, d, options, progress)
        copier.result.skipped = skipped
        try:
            await copier.run(todo)
            retry = [f.item for f in copier.mismatched]
            if retry and copier.remote is not None:
                for f in copier.mismatched:
                    log.warning("%s; reading it again from the origin", f.failed)
                    e = f.item.entry
                    await copier.remote.purge(e.data_offset, e.data_offset + e.data_size)
                copier.mismatched = []
                copier.result.retried = len(retry)
                await copier.run(retry)
            if copier.mismatched:
                first = copier.mismatched[0].failed
                more = len(copier.mismatched) - 1
                raise IntegrityError(f"{first}" + (f" (and {more} more files failed verification)" if more else ""))
        finally:
            copier.cleanup()
            progress.close()
        if options.preserve_times:
            _set_dir_times(d, items, dirs, created_ns)
        return copier.result
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


def _set_dir_times(d: _Dest, items: list[Item], dirs: list[bytes], created_ns: int | None) -> None:
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


__all__ = [
    "CopyOptions",
    "CopyResult",
    "Item",
    "check_clean_dest",
    "copy_items",
    "directory_mtime_ns",
    "first_error",
    "plan",
]
