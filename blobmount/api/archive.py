"""`blobmount.Archive`: an opened archive's metadata (answered from the in-memory index on the
calling thread), its bytes (read on the engine's thread through the mount's reader), seekable file
objects, and Python's own exceptions for a missing path, a directory or a non-directory."""

from __future__ import annotations

import errno
import functools
import io
import os
import stat as stat_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, ParamSpec, TypeVar

from blobmount.api.engine import Engine, in_worker
from blobmount.errors import BlobmountError, IsADirectory, NotADirectory, NotFound, SourceError
from blobmount.index.paths import show

if TYPE_CHECKING:
    from blobmount.index import Entry, IndexView
    from blobmount.reader import Handle, Reader
    from blobmount.sources.base import Archive as OpenedSource

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Stat:
    """What the index says of one path (a directory has no entry: size 0, the root's times)."""

    path: str  # relative to the archive root, '' for the root; undecodable bytes as surrogates
    type: Literal["file", "directory"]
    size: int
    mode: int  # full st_mode (type bits included)
    uid: int
    gid: int
    mtime_ns: int
    sha256: str | None  # hex, files only
    compression: Literal["none", "zstd"] | None
    stored_size: int | None  # bytes in the data blob

    @property
    def is_dir(self) -> bool:
        return self.type == "directory"


def _to_bytes(path: str | bytes | os.PathLike[str]) -> bytes:
    raw = os.fsencode(path)
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if any(p == b".." for p in parts):
        raise NotFound(f"{show(raw)}: '..' does not name anything in an archive")
    return b"/".join(parts)


def _to_str(path: bytes) -> str:
    return os.fsdecode(path)


_STD: tuple[tuple[type[BlobmountError], type[OSError], int], ...] = (
    (NotFound, FileNotFoundError, errno.ENOENT),
    (IsADirectory, IsADirectoryError, errno.EISDIR),
    (NotADirectory, NotADirectoryError, errno.ENOTDIR),
)


def _std_errors(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Python's own exceptions for "no such path", "is a directory", "not a directory" (what
    callers and fsspec catch); the original is the __cause__. Integrity and source failures stay
    blobmount's (IntegrityError, SourceError): they are not a missing file."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except (NotFound, IsADirectory, NotADirectory) as exc:
            for ours, theirs, code in _STD:
                if isinstance(exc, ours):
                    raise theirs(code, str(exc)) from exc
            raise

    return wrapper


class Archive:
    """An opened blob archive (see the module docstring). Use as a context manager, or close()."""

    def __init__(self, opened: OpenedSource, view: IndexView, engine: Engine) -> None:
        self.name = opened.name  # the pinned reference (registry: by digest) or the local path
        self.index_digest = opened.index_digest
        self._opened = opened
        self._view = view
        self._engine = engine
        self._root_mtime_ns = 0

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the I/O thread and close the source (open file objects stop working)."""
        self._engine.close()

    def __repr__(self) -> str:
        return f"<blobmount.Archive {self.name!r}: {len(self._view)} entries>"

    # -- metadata (the in-memory index; no I/O) ---------------------------------------------------

    def _entry(self, path: str | bytes | os.PathLike[str]) -> Entry:
        raw = _to_bytes(path)
        number = self._view.resolve(raw)
        if number < 0:
            raise IsADirectory(f"{show(raw)}: is a directory")
        return self._view.entry(number)

    def _stat_of(self, raw: bytes, number: int) -> Stat:
        if number < 0:
            return Stat(
                _to_str(raw), "directory", 0, stat_mod.S_IFDIR | 0o555, 0, 0, self._root_mtime_ns, None, None, None
            )
        e = self._view.entry(number)
        return Stat(
            _to_str(e.path),
            "file",
            e.original_size,
            stat_mod.S_IFREG | (e.mode & 0o7777),
            e.uid,
            e.gid,
            e.mtime_ns,
            e.hash.hex(),
            "zstd" if e.compression else "none",
            e.data_size,
        )

    @_std_errors
    def stat(self, path: str | bytes | os.PathLike[str]) -> Stat:
        """The path's metadata; NotFound (a FileNotFoundError) when the archive has no such path."""
        raw = _to_bytes(path)
        return self._stat_of(raw, self._view.resolve(raw))

    @_std_errors
    def exists(self, path: str | bytes | os.PathLike[str]) -> bool:
        try:
            return self._view.kind(_to_bytes(path)) is not None
        except NotFound:
            return False

    @_std_errors
    def ls(self, path: str | bytes | os.PathLike[str] = "") -> list[Stat]:
        """The entries directly inside `path`, in index order (a file: itself)."""
        raw = _to_bytes(path)
        number = self._view.resolve(raw)
        if number >= 0:
            return [self._stat_of(raw, number)]
        prefix = raw + b"/" if raw else b""
        return [self._stat_of(prefix + c.name, c.entry) for c in self._view.children(raw)]

    @_std_errors
    def walk(self, top: str | bytes | os.PathLike[str] = "") -> Iterator[tuple[str, list[str], list[str]]]:
        """Like os.walk, top-down: (directory, subdirectory names, file names); paths relative.
        A missing or non-directory `top` raises here, not at the first step."""
        start = _to_bytes(top)
        if self._view.resolve(start) >= 0:
            raise NotADirectory(f"{show(start)}: not a directory")
        return self._walk(start)

    def _walk(self, start: bytes) -> Iterator[tuple[str, list[str], list[str]]]:
        pending = [start]
        while pending:
            here = pending.pop()
            dirs: list[bytes] = []
            files: list[bytes] = []
            for child in self._view.children(here):
                (dirs if child.is_dir else files).append(child.name)
            yield _to_str(here), [_to_str(d) for d in dirs], [_to_str(f) for f in files]
            prefix = here + b"/" if here else b""
            pending.extend(prefix + d for d in reversed(dirs))

    def entries(self, prefix: str | bytes | os.PathLike[str] = "") -> Iterator[Stat]:
        """Every file under the directory `prefix` ('' = all), depth first in name order."""
        walk = self.walk(prefix)
        return (self.stat(d + "/" + name if d else name) for d, _dirs, files in walk for name in files)

    # -- bytes -------------------------------------------------------------------------------------

    @_std_errors
    def read_bytes(self, path: str | bytes | os.PathLike[str]) -> bytes:
        """The whole file, verified before it is returned (under every policy)."""
        entry = self._entry(path)
        return self._engine.call(self._read_whole, entry)

    async def _read_whole(self, entry: Entry) -> bytes:
        reader = self._reader()
        return b"".join([block async for block in reader.stream_verified(entry)])

    @_std_errors
    def read_range(self, path: str | bytes | os.PathLike[str], start: int, end: int) -> bytes:
        """Bytes [start, end) of the file (clamped to it), under the archive's verify policy."""
        entry = self._entry(path)
        return self._engine.call(self._read_range, entry, start, end)

    async def _read_range(self, entry: Entry, start: int, end: int) -> bytes:
        reader = self._reader()
        handle = await reader.open(entry)
        try:
            return await _read_span(reader, handle, start, end)
        finally:
            reader.close(handle)

    @_std_errors
    def open(self, path: str | bytes | os.PathLike[str]) -> io.BufferedReader:
        """A seekable binary file object (buffered, 1 MiB: the reader's block); one reader handle
        for its life, as an open() of the mount. Reads follow the verify policy."""
        entry = self._entry(path)
        return io.BufferedReader(_RawFile(self, entry), buffer_size=1 << 20)

    @_std_errors
    def verified(self, path: str | bytes | os.PathLike[str]) -> str:
        """'verified', 'unverified' or 'poisoned': what the mount shows as user.blobmount.verified."""
        return self._reader().state(self._entry(path))

    def _reader(self) -> Reader:
        reader = self._engine.reader
        if reader is None:
            raise SourceError("the archive is closed")
        return reader

    # -- the same, for trio and asyncio callers ----------------------------------------------------

    async def aread_bytes(self, path: str | bytes | os.PathLike[str]) -> bytes:
        return await in_worker(self.read_bytes, path)

    async def aread_range(self, path: str | bytes | os.PathLike[str], start: int, end: int) -> bytes:
        return await in_worker(self.read_range, path, start, end)

    async def aclose(self) -> None:
        await in_worker(self.close)


async def _read_span(reader: Reader, handle: Handle, start: int, end: int) -> bytes:
    from blobmount.reader import BLOCK_BYTES

    size = handle.entry.original_size
    start, end = max(0, min(start, size)), max(0, min(end, size))
    parts: list[bytes] = []
    pos = start
    while pos < end:
        block = await reader.read(handle, pos, min(BLOCK_BYTES, end - pos))
        if not block:
            raise SourceError(f"{show(handle.entry.path)}: ended early at byte {pos}")
        parts.append(block)
        pos += len(block)
    return b"".join(parts)


class _RawFile(io.RawIOBase):
    """One open handle of the reader: the unit the verify policy tracks, as in the mount."""

    def __init__(self, archive: Archive, entry: Entry) -> None:
        self._archive = archive
        self._entry = entry
        self._pos = 0
        self._handle: Handle = archive._engine.call(self._open)
        self.name = _to_str(entry.path)

    async def _open(self) -> Handle:
        return await self._archive._reader().open(self._entry)

    async def _read(self, start: int, end: int) -> bytes:
        return await _read_span(self._archive._reader(), self._handle, start, end)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._entry.original_size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("read of a closed file")
        data = self._archive._engine.call(self._read, self._pos, self._pos + len(b))
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                reader = self._archive._engine.reader
                if reader is not None:
                    self._archive._engine.call(self._release, reader)
            except SourceError:
                pass  # the archive was closed first: the reader is gone with it
            finally:
                super().close()

    async def _release(self, reader: Reader) -> None:
        reader.close(self._handle)
