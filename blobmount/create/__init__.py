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

The package: :mod:`.options` (what is asked), :mod:`.walk` (the source tree), :mod:`.files` (one
file read, hashed, compressed; the data blob's writer), :mod:`.parallel` (the compression workers
and the one writer); :func:`create_archive` here joins them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Generator
from pathlib import Path

from blobmount.create.files import BlobWriter, Hasher, Ring, Stored, archive_file, compressor_for
from blobmount.create.options import CHANGE_DETECTION, CreateOptions, CreateResult, extension_list
from blobmount.create.parallel import store_parallel
from blobmount.create.walk import Source, walk_tree
from blobmount.errors import DestinationError, LimitExceeded, UsageError
from blobmount.index import EntryRecord, build_index
from blobmount.progress import ProgressLine

INDEX_NAME = "index.blob"
DATA_NAME = "data.blob"
_PROGRESS_MIN_BYTES = 64 << 20


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
    compressor = compressor_for(opts) if opts.compression == "zstd" else None
    threads = opts.worker_threads() if compressor is not None else 1
    data_tmp = out / f".{DATA_NAME}.tmp"
    index_tmp = out / f".{INDEX_NAME}.tmp"
    records: list[EntryRecord] = []
    ring = Ring()
    blob_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blob-sha256")
    file_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="file-sha256")
    try:
        _make_out_dir(out)
        with open(data_tmp, "wb") as data_file:
            blob = BlobWriter(data_file, blob_pool)

            def store_here(src_file: Source) -> Stored:
                """On this thread: raw files, and every file when there is one thread."""
                ring_hasher = Hasher(file_pool)
                return archive_file(root, src_file, opts, ring, ring_hasher, blob.write, compressor, progress.advance)

            placed = (
                store_parallel(root, files, opts, threads, out, blob, store_here, progress.advance)
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
    files: list[Source], blob: BlobWriter, store_here: Callable[[Source], Stored]
) -> Generator[tuple[int, Stored]]:
    """Each file's blob offset and result, in path order, written on this thread."""
    for src_file in files:
        offset = blob.size
        yield offset, store_here(src_file)


def _make_out_dir(out: Path) -> None:
    """OUT_DIR and its parents; a file in the way is said so (mkdir's own words are "File exists")."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DestinationError(f"{out}: exists and is not a directory") from None


__all__ = ["CreateOptions", "CreateResult", "create_archive", "extension_list"]
