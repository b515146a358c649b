"""Creating archives from a directory: walk, compress, hash, then hand the entries to index/.

Contents are streamed in fixed-size blocks, so memory grows with the number of files (one small
record each), never with their size. Output is written to temporary names in OUT_DIR and renamed
into place only when complete, so a failed or interrupted create never leaves a half archive that
looks whole. There is no fsync (tar and mksquashfs do none either): a power cut can leave a torn
data blob, but every file and the blob itself carry sha256s, so it is refused, never served.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from blobmount.errors import DestinationError, SourceError, UsageError
from blobmount.index import COMPRESSION_NONE, COMPRESSION_ZSTD, EntryRecord, build_index
from blobmount.index.paths import path_problem, show

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
_PROGRESS_MIN_BYTES = 64 << 20
_THREAD_HASH_MIN_BYTES = 256 << 10  # below this, hashing inline beats a thread hop


@dataclass(frozen=True, slots=True)
class CreateOptions:
    compression: str = "zstd"  # "zstd" or "none"
    level: int = DEFAULT_LEVEL
    progress: bool | None = None  # None: only when stderr is a terminal and the tree is large


@dataclass(frozen=True, slots=True)
class CreateResult:
    entries: int
    data_size: int
    data_sha256: str
    index_size: int
    index_sha256: str
    skipped: int


def wants_compression(path: bytes, size: int) -> bool:
    """The reference CLI's default skip rule: small files and known compressed extensions stay raw."""
    if size < SKIP_BELOW_BYTES:
        return False
    name = path.rpartition(b"/")[2]
    dot = name.rfind(b".")
    return dot < 0 or name[dot:].lower() not in SKIP_EXTENSIONS


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

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self._pool = pool
        self._hash = hashlib.sha256()
        self._pending: concurrent.futures.Future[None] | None = None

    def update(self, data: bytes | memoryview) -> None:
        """Hash `data`; the caller must leave it untouched until its next update() returns (the
        readers rotate over READ_BUFFERS buffers, so no block is ever copied)."""
        self._wait()
        if len(data) < _THREAD_HASH_MIN_BYTES:
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


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self._last = -1

    def advance(self, n: int) -> None:
        if not self.enabled:
            return
        self.done += n
        pct = self.done * 100 // self.total
        if pct != self._last:
            self._last = pct
            bar = "#" * (pct // 4)
            sys.stderr.write(f"\rcreate [{bar:<25}] {pct:3d}% {self.done >> 20} MiB")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


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
    root = os.fsencode(src)
    if not os.path.isdir(root):
        raise UsageError(f"{os.fsdecode(root)}: not a directory")
    out = Path(out_dir)
    files, skipped = walk_tree(root)
    total = sum(f.st.st_size for f in files)
    show_progress = (
        opts.progress if opts.progress is not None else (sys.stderr.isatty() and total >= _PROGRESS_MIN_BYTES)
    )
    progress = _Progress(total, show_progress)
    compressor = (
        zstandard.ZstdCompressor(level=opts.level, write_checksum=True) if (opts.compression == "zstd") else None
    )
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
            for src_file in files:
                records.append(_store(root, src_file, blob, _Hasher(file_pool), compressor, ring, progress.advance))
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


def _make_out_dir(out: Path) -> None:
    """OUT_DIR and its parents; a file in the way is said so (mkdir's own words are "File exists")."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DestinationError(f"{out}: exists and is not a directory") from None


def _store(
    root: bytes,
    src: _Source,
    blob: _BlobWriter,
    digest: _Hasher,
    compressor: zstandard.ZstdCompressor | None,
    ring: _Ring,
    advance: Callable[[int], None],
) -> EntryRecord:
    full = os.path.join(root, src.rel)
    offset = blob.size
    original = 0
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    except PermissionError:  # O_NOATIME needs ownership; retry without it
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SourceError(f"{show(src.rel)}: cannot open: {exc.strerror}") from exc
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{show(src.rel)}: changed into a non-regular file while archiving")
        zstd = compressor is not None and wants_compression(src.rel, st.st_size)
        if zstd and compressor is not None:
            chunker = compressor.chunker(size=st.st_size, chunk_size=BLOCK_BYTES)
            for block in ring.blocks(f, src.rel):
                digest.update(block)
                original += len(block)
                advance(len(block))
                for out in chunker.compress(block):
                    blob.write(out)
            if original:
                for out in chunker.finish():  # type: ignore[no-untyped-call]
                    blob.write(out)
        else:
            for block in ring.blocks(f, src.rel):
                digest.update(block)
                original += len(block)
                advance(len(block))
                blob.write(block)
    if original != st.st_size:
        raise SourceError(f"{show(src.rel)}: changed size while archiving ({st.st_size} -> {original})")
    return EntryRecord(
        path=src.rel,
        data_offset=offset,
        data_size=blob.size - offset,
        original_size=original,
        hash=digest.digest(),
        mode=st.st_mode & 0o777,
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        compression=COMPRESSION_ZSTD if zstd and original else COMPRESSION_NONE,
    )
