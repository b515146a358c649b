"""Creating archives from a directory: walk, compress, hash, then hand the entries to index/.

Contents are streamed in fixed-size blocks, so memory grows with the number of files (one small
record each), never with their size. Output is written to temporary names in OUT_DIR and renamed
into place only when complete, so a failed or interrupted create never leaves a half archive that
looks whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from blobmount.errors import SourceError, UsageError
from blobmount.index import COMPRESSION_NONE, COMPRESSION_ZSTD, EntryRecord, build_index
from blobmount.index.paths import path_problem, show

log = logging.getLogger(__name__)

INDEX_NAME = "index.blob"
DATA_NAME = "data.blob"
BLOCK_BYTES = 1 << 20  # read/hash/write granularity: large enough to amortize syscalls and GIL hops
SKIP_BELOW_BYTES = 1024  # the reference CLI's DefaultSkipCompression(1024): tiny files stay raw
DEFAULT_LEVEL = 3  # zstd's own default: the reference's speed/ratio trade-off is close to it
# The reference CLI's default list: formats that are already compressed (name only, never content).
SKIP_EXTENSIONS = frozenset(
    b".7z .aac .avif .br .bz2 .flac .gif .gz .heic .ico .jpeg .jpg .m4v .mkv .mov .mp3 .mp4 .ogg"
    b" .opus .pdf .png .rar .tgz .wav .webm .webp .woff .woff2 .xz .zip .zst".split()
)
_PROGRESS_MIN_BYTES = 64 << 20
_THREAD_HASH_MIN_BYTES = (
    256 << 10
)  # below this, hashing inline beats starting a thread  # below this a progress bar is only noise


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


class _BlobWriter:
    """Appends to the data blob and hashes it; the whole-blob sha256 runs on a helper thread so it
    overlaps with reading and per-file hashing (hashlib releases the GIL on large updates)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0
        self._pending: threading.Thread | None = None

    def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        self._out.write(data)
        self.size += len(data)
        self._join()
        if len(data) < _THREAD_HASH_MIN_BYTES:  # a thread costs more than hashing a small block
            self._hash.update(data)
            return
        block = bytes(data)  # the caller reuses its buffer
        self._pending = threading.Thread(target=self._hash.update, args=(block,), daemon=True)
        self._pending.start()

    def _join(self) -> None:
        if self._pending is not None:
            self._pending.join()
            self._pending = None

    def hexdigest(self) -> str:
        self._join()
        return self._hash.hexdigest()


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


def _blocks(f: BinaryIO, buf: bytearray) -> Iterator[memoryview]:
    view = memoryview(buf)
    while True:
        n = f.readinto(buf)  # type: ignore[attr-defined]
        if not n:
            return
        yield view[:n]


def create_archive(src: str | Path, out_dir: str | Path, options: CreateOptions | None = None) -> CreateResult:
    """Write `out_dir`/index.blob and `out_dir`/data.blob from the regular files under `src`."""
    opts = options or CreateOptions()
    if opts.compression not in ("zstd", "none"):
        raise UsageError(f"unknown compression {opts.compression!r} (use zstd or none)")
    root = os.fsencode(src)
    if not os.path.isdir(root):
        raise UsageError(f"{os.fsdecode(root)}: not a directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    buf = bytearray(BLOCK_BYTES)
    try:
        with open(data_tmp, "wb") as data_file:
            blob = _BlobWriter(data_file)
            for src_file in files:
                records.append(_store(root, src_file, blob, compressor, buf, progress.advance))
            data_hash = blob.hexdigest()
            data_file.flush()
            os.fsync(data_file.fileno())
        progress.close()
        index = build_index(records, blob.size, bytes.fromhex(data_hash))
        with open(index_tmp, "wb") as index_file:
            index_file.write(index)
            index_file.flush()
            os.fsync(index_file.fileno())
        os.replace(data_tmp, out / DATA_NAME)
        os.replace(index_tmp, out / INDEX_NAME)
    finally:
        for tmp in (data_tmp, index_tmp):
            tmp.unlink(missing_ok=True)
    return CreateResult(
        entries=len(records),
        data_size=blob.size,
        data_sha256=data_hash,
        index_size=len(index),
        index_sha256=hashlib.sha256(index).hexdigest(),
        skipped=skipped,
    )


def _store(
    root: bytes,
    src: _Source,
    blob: _BlobWriter,
    compressor: zstandard.ZstdCompressor | None,
    buf: bytearray,
    advance: Callable[[int], None],
) -> EntryRecord:
    full = os.path.join(root, src.rel)
    offset = blob.size
    digest = hashlib.sha256()
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
            for block in _blocks(f, buf):
                digest.update(block)
                original += len(block)
                advance(len(block))
                for out in chunker.compress(block):
                    blob.write(out)
            if original:
                for out in chunker.finish():  # type: ignore[no-untyped-call]
                    blob.write(out)
        else:
            for block in _blocks(f, buf):
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
