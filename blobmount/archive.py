"""Creating archives from a directory: walk, compress, hash, then hand the entries to index/.

Contents are streamed in fixed-size blocks, so memory grows with the number of files (one small
record each), never with their size. With zstd, files are compressed on one thread per core, in
parallel, while one thread writes them out in path order: the bytes are the same as one thread's
(each file is its own zstd frame, made the same way on any thread), and what waits for its turn is
held in memory up to a fixed budget, then in a temporary file beside the output.

Output is written to temporary names in OUT_DIR and renamed into place only when complete, so a
failed or interrupted create never leaves a half archive that looks whole. There is no fsync (tar
and mksquashfs do none either): a power cut can leave a torn data blob, but every file and the blob
itself carry sha256s, so it is refused, never served.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
import stat
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from blobmount.errors import DestinationError, LimitExceeded, SourceError, UsageError
from blobmount.index import COMPRESSION_NONE, COMPRESSION_ZSTD, EntryRecord, build_index
from blobmount.index.paths import path_problem, show
from blobmount.progress import ProgressLine

log = logging.getLogger(__name__)

INDEX_NAME = "index.blob"
DATA_NAME = "data.blob"
BLOCK_BYTES = 1 << 20
READ_BUFFERS = 3  # one being read, one being hashed, one spare: hashers lag at most one block
SKIP_BELOW_BYTES = 1024  # the reference CLI's DefaultSkipCompression(1024): tiny files stay raw
DEFAULT_LEVEL = 3  # zstd's own default: the reference's speed/ratio trade-off is close to it
# The reference CLI's default list: formats that are already compressed (name only, never content).
SKIP_EXTENSIONS = frozenset(
    b".7z .aac .avif .br .bz2 .flac .gif .gz .heic .ico .jpeg .jpg .m4v .mkv .mov .mp3 .mp4 .ogg"
    b" .opus .pdf .png .rar .tgz .wav .webm .webp .woff .woff2 .xz .zip .zst".split()
)
REFERENCE_MAX_FILES = 200_000  # the reference writer's DefaultMaxFiles (its MaxFiles 0 means this)
CHANGE_DETECTION = ("none", "strict")
_PROGRESS_MIN_BYTES = 64 << 20
_THREAD_HASH_MIN_BYTES = 256 << 10  # below this, hashing inline beats a thread hop
# Parallel zstd: compressed output of files not yet written is held in memory up to this much in
# all, then spilled to a temporary file; the file being written holds at most _HEAD_BUFFER_BYTES
# (its worker waits for the writer); at most _AHEAD files are queued behind it.
_PARALLEL_BUFFER_BYTES = 128 << 20
_HEAD_BUFFER_BYTES = 8 << 20
_AHEAD = 256


@dataclass(frozen=True, slots=True)
class CreateOptions:
    compression: str = "zstd"  # "zstd" or "none"
    level: int = DEFAULT_LEVEL
    progress: bool | None = None  # None: only when stderr is a terminal and the tree is large
    max_files: int | None = None  # None or negative: no limit; 0: the reference's 200,000; N: N
    change_detection: str = "none"  # "strict": a file whose size or mtime changes while read fails
    skip_compression: bool = True  # False: every file is compressed (with zstd), whatever its size or name
    skip_below: int = SKIP_BELOW_BYTES  # files smaller than this stay raw
    skip_extensions: frozenset[bytes] = SKIP_EXTENSIONS  # lower-case, with the dot
    threads: int = 0  # zstd compression threads; 0: one per core this process may use

    def compresses(self, path: bytes, size: int) -> bool:
        """Whether a file of this name and size is compressed (the reference's skip rule: small
        files and known compressed extensions stay raw, by name only, never by content)."""
        if self.compression != "zstd":
            return False
        if not self.skip_compression:
            return True
        if size < self.skip_below:
            return False
        name = path.rpartition(b"/")[2]
        dot = name.rfind(b".")
        return dot < 0 or name[dot:].lower() not in self.skip_extensions

    def file_limit(self) -> int | None:
        """The reference's MaxFiles meanings: 0 is its default, a negative number no limit."""
        if self.max_files is None or self.max_files < 0:
            return None
        return self.max_files or REFERENCE_MAX_FILES

    def worker_threads(self) -> int:
        if self.threads > 0:
            return self.threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return os.cpu_count() or 1


def extension_list(text: str) -> frozenset[bytes]:
    """`png,.JPG gz` -> {b".png", b".jpg", b".gz"}: the form --skip-compression-ext takes."""
    words = text.replace(",", " ").split()
    return frozenset(b"." + os.fsencode(w.lower().lstrip(".")) for w in words if w.strip("."))


@dataclass(frozen=True, slots=True)
class CreateResult:
    entries: int
    data_size: int
    data_sha256: str
    index_size: int
    index_sha256: str
    skipped: int


@dataclass(frozen=True, slots=True)
class _Source:
    rel: bytes
    st: os.stat_result


def walk_tree(root: bytes) -> tuple[list[_Source], int]:
    """Regular files under `root` as (relative byte path, lstat), sorted by path bytes.

    Symlinks and special files are skipped with a warning and never followed. Returns the files and
    the number skipped."""
    found: list[_Source] = []
    skipped = 0
    stack: list[bytes] = [b""]
    while stack:
        rel_dir = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel_dir) if rel_dir else root)
        except OSError as exc:
            raise SourceError(f"{show(rel_dir or b'.')}: cannot list: {exc.strerror}") from exc
        with it:
            for de in it:
                rel = rel_dir + b"/" + de.name if rel_dir else de.name
                st = de.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    problem = path_problem(rel)
                    if problem is not None:
                        log.warning("%s: %s; skipped", show(rel), problem)
                        skipped += 1
                        continue
                    found.append(_Source(rel, st))
                else:
                    kind = "symlink" if stat.S_ISLNK(st.st_mode) else "special file"
                    log.warning("%s: %s skipped (only regular files are archived)", show(rel), kind)
                    skipped += 1
    found.sort(key=lambda s: s.rel)
    return found, skipped


class _Hasher:
    """sha256 fed in order from the reading thread, computed on a worker thread of its own.

    Two of these (one per file, one for the whole data blob) run on two cores while the main
    thread only reads and writes: hashlib releases the GIL on large updates, so create keeps up
    with tar instead of paying for two hashes in series. Small blocks are hashed inline (a thread
    hop costs more than they do)."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor | None) -> None:
        self._pool = pool  # None: always inline (a compression worker hashes on its own thread)
        self._hash = hashlib.sha256()
        self._pending: concurrent.futures.Future[None] | None = None

    def update(self, data: bytes | memoryview) -> None:
        """Hash `data`; the caller must leave it untouched until its next update() returns (the
        readers rotate over READ_BUFFERS buffers, so no block is ever copied)."""
        self._wait()
        if self._pool is None or len(data) < _THREAD_HASH_MIN_BYTES:
            self._hash.update(data)
            return
        self._pending = self._pool.submit(self._hash.update, data)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def digest(self) -> bytes:
        self._wait()
        return self._hash.digest()


class _BlobWriter:
    """Appends to the data blob and hashes it (see :class:`_Hasher`)."""

    def __init__(self, out: BinaryIO, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self._out = out
        self._hash = _Hasher(pool)
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        self._out.write(data)
        self.size += len(data)
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.digest().hex()


class _Ring:
    """READ_BUFFERS read buffers, used in turn across files as well as within one.

    The hashers lag at most one block behind the reader, and the blob's hasher may still be
    hashing a file's last block when the next file's first block is read: restarting at the first
    buffer for each file overwrote that block mid-hash (a data_hash that matched no blob and
    changed from run to run). So the turn never restarts, and a read that finds the end of a
    file, filling nothing, does not take a turn."""

    def __init__(self) -> None:
        self._bufs = [bytearray(BLOCK_BYTES) for _ in range(READ_BUFFERS)]
        self._next = 0

    def blocks(self, f: BinaryIO, rel: bytes) -> Iterator[memoryview]:
        while True:
            buf = self._bufs[self._next]
            try:
                n = f.readinto(buf)  # type: ignore[attr-defined]
            except OSError as exc:
                raise SourceError(f"{show(rel)}: cannot read: {exc.strerror}") from exc
            if not n:
                return
            self._next = (self._next + 1) % len(self._bufs)
            yield memoryview(buf)[:n]


def create_archive(src: str | Path, out_dir: str | Path, options: CreateOptions | None = None) -> CreateResult:
    """Write `out_dir`/index.blob and `out_dir`/data.blob from the regular files under `src`."""
    opts = options or CreateOptions()
    if opts.compression not in ("zstd", "none"):
        raise UsageError(f"unknown compression {opts.compression!r} (use zstd or none)")
    if opts.change_detection not in CHANGE_DETECTION:
        raise UsageError(f"unknown change detection {opts.change_detection!r} (use none or strict)")
    root = os.fsencode(src)
    if not os.path.isdir(root):
        raise UsageError(f"{os.fsdecode(root)}: not a directory")
    out = Path(out_dir)
    files, skipped = walk_tree(root)
    limit = opts.file_limit()
    if limit is not None and len(files) > limit:
        raise LimitExceeded(f"{os.fsdecode(root)}: {len(files)} files, more than --max-files {limit}")
    total = sum(f.st.st_size for f in files)
    show_progress = (
        opts.progress if opts.progress is not None else (sys.stderr.isatty() and total >= _PROGRESS_MIN_BYTES)
    )
    progress = ProgressLine("create", total, enabled=show_progress)
    compressor = _compressor(opts) if opts.compression == "zstd" else None
    threads = opts.worker_threads() if compressor is not None else 1
    data_tmp = out / f".{DATA_NAME}.tmp"
    index_tmp = out / f".{INDEX_NAME}.tmp"
    records: list[EntryRecord] = []
    ring = _Ring()
    blob_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blob-sha256")
    file_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="file-sha256")
    try:
        _make_out_dir(out)
        with open(data_tmp, "wb") as data_file:
            blob = _BlobWriter(data_file, blob_pool)

            def store_here(src_file: _Source) -> _Stored:
                """On this thread: raw files, and every file when there is one thread."""
                ring_hasher = _Hasher(file_pool)
                return _archive_file(root, src_file, opts, ring, ring_hasher, blob.write, compressor, progress.advance)

            placed = (
                _store_parallel(root, files, opts, threads, out, blob, store_here, progress.advance)
                if threads > 1
                else _store_serial(files, blob, store_here)
            )
            with contextlib.closing(placed):
                for src_file, (offset, done) in zip(files, placed, strict=True):
                    records.append(done.record(src_file, offset, blob.size - offset))
            data_hash = blob.hexdigest()
        progress.close()
        index = build_index(records, blob.size, bytes.fromhex(data_hash))
        with open(index_tmp, "wb") as index_file:
            index_file.write(index)
        os.replace(data_tmp, out / DATA_NAME)
        os.replace(index_tmp, out / INDEX_NAME)
    except OSError as exc:  # reading the sources raised SourceError: this is the output side
        raise DestinationError(f"{out}: cannot write the archive: {exc.strerror or exc}") from exc
    finally:
        blob_pool.shutdown()
        file_pool.shutdown()
        for tmp in (data_tmp, index_tmp):
            with contextlib.suppress(OSError):  # not there, or a read-only OUT_DIR
                tmp.unlink(missing_ok=True)
    return CreateResult(
        entries=len(records),
        data_size=blob.size,
        data_sha256=data_hash,
        index_size=len(index),
        index_sha256=hashlib.sha256(index).hexdigest(),
        skipped=skipped,
    )


def _store_serial(
    files: list[_Source], blob: _BlobWriter, store_here: Callable[[_Source], _Stored]
) -> Generator[tuple[int, _Stored]]:
    """Each file's blob offset and result, in path order, written on this thread."""
    for src_file in files:
        offset = blob.size
        yield offset, store_here(src_file)


def _compressor(opts: CreateOptions) -> zstandard.ZstdCompressor:
    """One per thread (a compressor is not shared); every one makes the same frame of the same file."""
    return zstandard.ZstdCompressor(level=opts.level, write_checksum=True)


def _make_out_dir(out: Path) -> None:
    """OUT_DIR and its parents; a file in the way is said so (mkdir's own words are "File exists")."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DestinationError(f"{out}: exists and is not a directory") from None


@dataclass(frozen=True, slots=True)
class _Stored:
    """What archiving one file found: the rest of its record is where the writer put it."""

    original: int
    hash: bytes
    st: os.stat_result
    zstd: bool

    def record(self, src: _Source, offset: int, size: int) -> EntryRecord:
        return EntryRecord(
            path=src.rel,
            data_offset=offset,
            data_size=size,
            original_size=self.original,
            hash=self.hash,
            mode=self.st.st_mode & 0o777,
            uid=self.st.st_uid,
            gid=self.st.st_gid,
            mtime_ns=self.st.st_mtime_ns,
            compression=COMPRESSION_ZSTD if self.zstd else COMPRESSION_NONE,
        )


def _open_source(full: bytes, rel: bytes) -> int:
    try:
        return os.open(full, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    except PermissionError:  # O_NOATIME needs ownership; retry without it
        try:
            return os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise SourceError(f"{show(rel)}: cannot open: {exc.strerror}") from exc
    except OSError as exc:
        raise SourceError(f"{show(rel)}: cannot open: {exc.strerror}") from exc


def _archive_file(
    root: bytes,
    src: _Source,
    opts: CreateOptions,
    ring: _Ring,
    digest: _Hasher,
    emit: Callable[[bytes | memoryview], None],
    compressor: zstandard.ZstdCompressor | None,
    advance: Callable[[int], None],
) -> _Stored:
    """Read one file, hash it and hand its stored bytes (zstd or raw) to `emit`, in order.

    `emit` may get a view of a read buffer (raw files): it must be done with it when it returns or,
    like the blob writer, hash it no more than one block behind."""
    fd = _open_source(os.path.join(root, src.rel), src.rel)
    strict = opts.change_detection == "strict"
    original = 0
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{show(src.rel)}: changed into a non-regular file while archiving")
        if strict and (st.st_dev, st.st_ino) != (src.st.st_dev, src.st.st_ino):
            raise SourceError(f"{show(src.rel)}: replaced by another file while archiving (--change-detection strict)")
        zstd = compressor is not None and opts.compresses(src.rel, st.st_size)
        if zstd and compressor is not None:
            chunker = compressor.chunker(size=st.st_size, chunk_size=BLOCK_BYTES)
            for block in ring.blocks(f, src.rel):
                digest.update(block)
                original += len(block)
                advance(len(block))
                for out in chunker.compress(block):
                    emit(out)
            if original:
                for out in chunker.finish():  # type: ignore[no-untyped-call]
                    emit(out)
        else:
            for block in ring.blocks(f, src.rel):
                digest.update(block)
                original += len(block)
                advance(len(block))
                emit(block)
        if strict:
            _check_unchanged(src.rel, st, os.fstat(f.fileno()))
    if original != st.st_size:
        raise SourceError(f"{show(src.rel)}: changed size while archiving ({st.st_size} -> {original})")
    return _Stored(original, digest.digest(), st, zstd and original > 0)


def _check_unchanged(rel: bytes, before: os.stat_result, after: os.stat_result) -> None:
    """--change-detection strict, after reading: the reference's test (size, mtime, permissions)."""
    changes = []
    if after.st_size != before.st_size:
        changes.append(f"size {before.st_size} -> {after.st_size}")
    if after.st_mtime_ns != before.st_mtime_ns:
        changes.append("mtime moved")
    if stat.S_IMODE(after.st_mode) != stat.S_IMODE(before.st_mode):
        changes.append(f"mode {stat.S_IMODE(before.st_mode):o} -> {stat.S_IMODE(after.st_mode):o}")
    if changes:
        raise SourceError(f"{show(rel)}: changed while archiving ({', '.join(changes)}; --change-detection strict)")


class _Aborted(Exception):
    """The writer gave up (an earlier file failed, the disk is full): a worker stops where it is."""


class _Job:
    """One file a compression worker archives while the writer is still busy with earlier ones.

    Its output, in order, as `segments`: bytes in memory while the shared budget lasts, then
    (offset, length) ranges of its own spool file. Only the worker appends, only the writer takes."""

    __slots__ = ("done", "error", "head", "memory", "result", "segments", "spool", "spooled", "src")

    def __init__(self, src: _Source) -> None:
        self.src = src
        self.segments: deque[bytes | tuple[int, int]] = deque()
        self.memory = 0  # bytes of segments in memory
        self.spool: BinaryIO | None = None
        self.spooled = 0
        self.head = False  # the writer is taking this file's output now
        self.done = False
        self.error: BaseException | None = None
        self.result: _Stored | None = None


class _Pipeline:
    """The hand-over between compression workers and the one writer, under one condition."""

    def __init__(self, out_dir: Path) -> None:
        self._cond = threading.Condition()
        self._out_dir = out_dir
        self._memory = 0  # in all jobs' segments
        self._aborted = False

    def put(self, job: _Job, data: bytes) -> None:
        """From a worker: the next piece of `job`'s output."""
        with self._cond:
            while True:
                if self._aborted:
                    raise _Aborted
                if job.head and job.memory >= _HEAD_BUFFER_BYTES:
                    self._cond.wait()
                    continue
                if job.head or self._memory + len(data) <= _PARALLEL_BUFFER_BYTES:
                    job.segments.append(data)
                    job.memory += len(data)
                    self._memory += len(data)
                    self._cond.notify_all()
                    return
                break
        if job.spool is None:
            job.spool = tempfile.TemporaryFile(dir=self._out_dir, prefix=".spool-", buffering=0)  # noqa: SIM115 (closed by release)
        view = memoryview(data)
        while view:
            view = view[job.spool.write(view) or 0 :]
        with self._cond:
            job.segments.append((job.spooled, len(data)))
            job.spooled += len(data)
            self._cond.notify_all()

    def finish(self, job: _Job, result: _Stored | None, error: BaseException | None) -> None:
        with self._cond:
            job.result, job.error, job.done = result, error, True
            self._cond.notify_all()

    def drain(self, job: _Job, write: Callable[[bytes], None]) -> _Stored:
        """From the writer: `job`'s output as it comes, then its result (or its error)."""
        with self._cond:
            job.head = True
            self._cond.notify_all()
        try:
            while True:
                with self._cond:
                    while not job.segments and not job.done:
                        self._cond.wait()
                    if job.error is not None:
                        raise job.error
                    if not job.segments:
                        break
                    segment = job.segments.popleft()
                    if isinstance(segment, bytes):
                        job.memory -= len(segment)
                        self._memory -= len(segment)
                        self._cond.notify_all()
                if isinstance(segment, bytes):
                    write(segment)
                    continue
                assert job.spool is not None
                offset, length = segment
                while length:
                    piece = os.pread(job.spool.fileno(), min(length, BLOCK_BYTES), offset)
                    if not piece:
                        raise OSError(f"spool file of {show(job.src.rel)} ended early")
                    write(piece)
                    offset += len(piece)
                    length -= len(piece)
        finally:
            self.release(job)
        assert job.result is not None
        return job.result

    def release(self, job: _Job) -> None:
        with self._cond:
            self._memory -= job.memory
            job.memory = 0
            job.segments.clear()
        if job.spool is not None:
            job.spool.close()
            job.spool = None

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()


def _put_copy(pipe: _Pipeline, job: _Job, data: bytes | memoryview) -> None:
    pipe.put(job, bytes(data))  # a raw block is a view of the worker's read buffer: copied


def _store_parallel(
    root: bytes,
    files: list[_Source],
    opts: CreateOptions,
    threads: int,
    out_dir: Path,
    blob: _BlobWriter,
    store_here: Callable[[_Source], _Stored],
    advance: Callable[[int], None],
) -> Generator[tuple[int, _Stored]]:
    """Each file's blob offset and result in path order, its bytes written to `blob` first.

    Files to compress go to `threads` workers, up to _AHEAD files ahead; raw ones are read here
    when their turn comes (no copy: the blob writer hashes them). The caller consumes it to the end
    or closes it (which stops the workers and drops what they made)."""
    pipe = _Pipeline(out_dir)
    local = threading.local()

    def work(job: _Job) -> None:
        if not hasattr(local, "ring"):
            local.ring, local.compressor = _Ring(), _compressor(opts)
        try:
            emit = functools.partial(_put_copy, pipe, job)
            done = _archive_file(root, job.src, opts, local.ring, _Hasher(None), emit, local.compressor, advance)
        except BaseException as exc:  # handed to the writer, raised there in path order
            pipe.finish(job, None, exc)
        else:
            pipe.finish(job, done, None)

    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="create-zstd")
    queued: deque[_Job | _Source] = deque()
    pending = iter(files)

    def fill() -> None:
        while len(queued) < _AHEAD:
            src = next(pending, None)
            if src is None:
                return
            if opts.compresses(src.rel, src.st.st_size):
                job = _Job(src)
                pool.submit(work, job)
                queued.append(job)
            else:
                queued.append(src)

    try:
        fill()
        while queued:
            item = queued.popleft()
            fill()
            offset = blob.size
            yield offset, (pipe.drain(item, blob.write) if isinstance(item, _Job) else store_here(item))
    finally:
        pipe.abort()
        pool.shutdown(wait=True, cancel_futures=True)
        for item in queued:
            if isinstance(item, _Job):
                pipe.release(item)
