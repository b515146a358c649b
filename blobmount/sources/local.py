"""A local directory holding index.blob + data.blob, and the data blob as a local file.

:class:`LocalFileSource` is also the source of any data blob that ends up whole on this machine (an
OCI layout's blob, a registry's blob downloaded whole into the cache).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import trio

from blobmount.errors import InvalidArchive, SourceError
from blobmount.manifest import MAX_INDEX_BYTES
from blobmount.readahead import ReadHint
from blobmount.sources.base import Archive


class LocalFileSource:
    """The data blob as a local file, read with pread (no caching: the page cache already does)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"{path}: cannot open data blob: {exc.strerror}") from exc
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def read_range_sync(self, start: int, end: int) -> bytes:
        if not 0 <= start <= end <= self._size:
            raise SourceError(f"{self.path}: range {start}..{end} outside the {self._size}-byte blob")
        parts = []
        pos = start
        while pos < end:
            try:
                got = os.pread(self._fd, end - pos, pos)
            except OSError as exc:
                raise SourceError(f"{self.path}: read at {pos}: {exc.strerror}") from exc
            if not got:
                raise SourceError(f"{self.path}: data blob shrank to {pos} bytes while mounted")
            parts.append(got)
            pos += len(got)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_range(self, start: int, end: int, hint: ReadHint | None = None) -> bytes:
        if end - start <= _INLINE_READ_BYTES:
            # Measured (bench/fs_local.py): a trio.to_thread hop per FUSE read halved cold sequential
            # throughput against squashfuse (0.45x), while an inline pread of up to 1 MiB (the
            # kernel's largest FUSE read) reached 0.94x. The cost: a local disk that stalls stalls
            # the event loop too, as it would stall any reader of the data blob.
            return self.read_range_sync(start, end)
        return await trio.to_thread.run_sync(self.read_range_sync, start, end)

    def close(self) -> None:
        os.close(self._fd)

    async def aclose(self) -> None:
        """Nothing needs the event loop here; the fd is closed by :meth:`close`."""


_INLINE_READ_BYTES = 1 << 20


def read_file(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise InvalidArchive(f"{path}: {what} of {size} bytes exceeds the {limit}-byte limit")
            return f.read(limit + 1)
    except FileNotFoundError as exc:
        raise SourceError(f"{path}: no such file") from exc
    except OSError as exc:
        raise SourceError(f"{path}: cannot read {what}: {exc.strerror}") from exc


def open_directory(path: Path) -> Archive:
    """A directory holding index.blob + data.blob."""
    if not path.is_dir():
        raise SourceError(f"{path}: not a directory holding index.blob and data.blob")
    index = read_file(path / "index.blob", MAX_INDEX_BYTES, "index blob")
    data = LocalFileSource(path / "data.blob")
    digest = "sha256:" + hashlib.sha256(index).hexdigest()
    return Archive(str(path), index, data, digest, mtime_ns(path / "index.blob"))


def mtime_ns(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None
