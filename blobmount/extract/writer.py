"""Phase 3's files: each decoded (zstd as a stream, bounded by the entry's size), hashed, written
to a temporary name in its own directory, checked against its sha256 and size, given its mode and
times, and only then renamed to its name: a failure never leaves a partial file under a final
name. A file that fails verification is set aside (``mismatched``) for the copy to read again.

Everything here runs on the trio thread or on a worker thread: it touches only the file it is
given, DEST through pinned descriptors, and the counters (under a lock). No fsync unless asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
import zstandard

from blobmount.errors import BlobmountError, DestinationError, IntegrityError, InvalidArchive
from blobmount.extract.dest import Dest
from blobmount.extract.options import CopyOptions, CopyResult
from blobmount.extract.plan import Item
from blobmount.index import COMPRESSION_ZSTD
from blobmount.index.paths import show
from blobmount.progress import ProgressLine

if TYPE_CHECKING:
    from blobmount.extract.pieces import Piece

log = logging.getLogger(__name__)

DECODE_BLOCK_BYTES = 1 << 20  # the streaming decoder's output unit: its memory bound
SMALL_DECODE_BYTES = 1 << 20  # zstd files up to this size are decoded in one call (bounded output)
_O_TMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(slots=True, eq=False)
class File:
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


class FileWriter:
    """Writes and verifies the files of one copy below DEST; counts what it wrote (``result``) and
    keeps the files that failed verification (``mismatched``)."""

    def __init__(self, dest: Dest, options: CopyOptions, progress: ProgressLine) -> None:
        self.dest = dest
        self.options = options
        self.progress = progress
        umask = os.umask(0)
        os.umask(umask)
        self.file_mode = 0o666 & ~umask
        self.result = CopyResult()
        # temporary names: one random part per copy, a counter per file (no getrandom per file;
        # O_EXCL still refuses a name that is taken, and the next number is tried)
        self._tmp_prefix = b".blobmount-cp." + secrets.token_hex(6).encode() + b"."
        self._tmp_numbers = itertools.count()  # next() is atomic under the GIL: threads share it
        self._local = threading.local()  # a zstd decompression context per thread, reused
        self.temps: dict[File, None] = {}  # open temporaries, removed if the copy fails
        self._counting = threading.Lock()  # files finish on worker threads too
        self.mismatched: list[File] = []

    def batch(self, piece: Piece, view: memoryview) -> None:
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
                    self.feed(f, view[a - piece.start : b - piece.start])  # decoded as a stream
                else:
                    self._whole(f, view[a - piece.start : b - piece.start], parent)
        finally:
            if pinned is not None:
                self.dest.unpin(pinned)

    def _whole(self, f: File, data: memoryview, parent: int) -> None:
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

    def _create(self, f: File, parent: int, mode: int) -> bytes:
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

    def feed(self, f: File, data: memoryview) -> None:
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

    def _open_temp(self, f: File) -> None:
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

    def _consume(self, f: File, data: memoryview) -> None:
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

    def _write(self, f: File, data: memoryview) -> None:
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

    def _finish(self, f: File) -> None:
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
                os.fsync(f.fd)  # on a worker thread (see copy.Copier.piece)
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

    def _discard(self, f: File) -> None:
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

    def _unpin(self, f: File) -> None:
        if f.parent >= 0:
            f.parent = -1
            self.dest.unpin(f.item.rel.rpartition(b"/")[0])

    def cleanup(self) -> None:
        for f in list(self.temps):
            self._discard(f)


class _Sink:
    """The streaming decoder's output: bounded by the entry's size, hashed, written."""

    def __init__(self, writer: FileWriter, f: File) -> None:
        self.writer, self.f = writer, f

    def write(self, data: bytes) -> int:
        self.writer._write(self.f, memoryview(data))
        return len(data)
