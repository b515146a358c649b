"""Parallel zstd for `create`: files compressed on one thread per core while one thread writes
them out in path order. The bytes are the same as one thread's (each file is its own zstd frame,
made the same way on any thread); what waits for its turn is held in memory up to a fixed budget,
then in a spool file beside the output."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Generator
from pathlib import Path
from typing import BinaryIO

from blobmount.create.files import BLOCK_BYTES, BlobWriter, Hasher, Ring, Stored, archive_file, compressor_for
from blobmount.create.options import CreateOptions
from blobmount.create.walk import Source
from blobmount.index.paths import show

# Parallel zstd: compressed output of files not yet written is held in memory up to this much in
# all, then spilled to a temporary file; the file being written holds at most HEAD_BUFFER_BYTES
# (its worker waits for the writer); at most AHEAD files are queued behind it.
PARALLEL_BUFFER_BYTES = 128 << 20
HEAD_BUFFER_BYTES = 8 << 20
AHEAD = 256


class _Aborted(Exception):
    """The writer gave up (an earlier file failed, the disk is full): a worker stops where it is."""


class Job:
    """One file a compression worker archives while the writer is still busy with earlier ones.

    Its output, in order, as `segments`: bytes in memory while the shared budget lasts, then
    (offset, length) ranges of its own spool file. Only the worker appends, only the writer takes."""

    __slots__ = ("done", "error", "head", "memory", "result", "segments", "spool", "spooled", "src")

    def __init__(self, src: Source) -> None:
        self.src = src
        self.segments: deque[bytes | tuple[int, int]] = deque()
        self.memory = 0  # bytes of segments in memory
        self.spool: BinaryIO | None = None
        self.spooled = 0
        self.head = False  # the writer is taking this file's output now
        self.done = False
        self.error: BaseException | None = None
        self.result: Stored | None = None


class Pipeline:
    """The hand-over between compression workers and the one writer, under one condition."""

    def __init__(self, out_dir: Path) -> None:
        self._cond = threading.Condition()
        self._out_dir = out_dir
        self._memory = 0  # in all jobs' segments
        self._aborted = False

    def put(self, job: Job, data: bytes) -> None:
        """From a worker: the next piece of `job`'s output."""
        with self._cond:
            while True:
                if self._aborted:
                    raise _Aborted
                if job.head and job.memory >= HEAD_BUFFER_BYTES:
                    self._cond.wait()
                    continue
                if job.head or self._memory + len(data) <= PARALLEL_BUFFER_BYTES:
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

    def finish(self, job: Job, result: Stored | None, error: BaseException | None) -> None:
        with self._cond:
            job.result, job.error, job.done = result, error, True
            self._cond.notify_all()

    def drain(self, job: Job, write: Callable[[bytes], None]) -> Stored:
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

    def release(self, job: Job) -> None:
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


def _put_copy(pipe: Pipeline, job: Job, data: bytes | memoryview) -> None:
    pipe.put(job, bytes(data))  # a raw block is a view of the worker's read buffer: copied


def store_parallel(
    root: bytes,
    files: list[Source],
    opts: CreateOptions,
    threads: int,
    out_dir: Path,
    blob: BlobWriter,
    store_here: Callable[[Source], Stored],
    advance: Callable[[int], None],
) -> Generator[tuple[int, Stored]]:
    """Each file's blob offset and result in path order, its bytes written to `blob` first.

    Files to compress go to `threads` workers, up to AHEAD files ahead; raw ones are read here
    when their turn comes (no copy: the blob writer hashes them). The caller consumes it to the end
    or closes it (which stops the workers and drops what they made)."""
    pipe = Pipeline(out_dir)
    local = threading.local()

    def work(job: Job) -> None:
        if not hasattr(local, "ring"):
            local.ring, local.compressor = Ring(), compressor_for(opts)
        try:
            emit = functools.partial(_put_copy, pipe, job)
            done = archive_file(root, job.src, opts, local.ring, Hasher(None), emit, local.compressor, advance)
        except BaseException as exc:  # handed to the writer, raised there in path order
            pipe.finish(job, None, exc)
        else:
            pipe.finish(job, done, None)

    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="create-zstd")
    queued: deque[Job | Source] = deque()
    pending = iter(files)

    def fill() -> None:
        while len(queued) < AHEAD:
            src = next(pending, None)
            if src is None:
                return
            if opts.compresses(src.rel, src.st.st_size):
                job = Job(src)
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
            yield offset, (pipe.drain(item, blob.write) if isinstance(item, Job) else store_here(item))
    finally:
        pipe.abort()
        pool.shutdown(wait=True, cancel_futures=True)
        for item in queued:
            if isinstance(item, Job):
                pipe.release(item)
