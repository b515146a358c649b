"""The Python API: ``blobmount.open(SOURCE) -> Archive``, read-only, without FUSE.

It is the mount's data path without the kernel: the same SOURCE syntax and opening code
(sources.py), the same index view, and the same :class:`~blobmount.reader.Reader` with the same
verify policy, cache directory and cross-process single flight (a chunk that a mount is fetching
is not fetched again here, and the other way round).

Why a thread of its own: the data path is trio code whose fetches live in a long-lived nursery
(read-ahead, write-back, background verification outlive the read that started them). An
:class:`Archive` therefore runs one trio loop on a daemon thread and every read crosses to it with
``trio.from_thread.run``. That one mechanism serves all three kinds of caller: plain code calls the
methods; trio and asyncio code await the ``a``-prefixed twins, which hand the call to a worker
thread of *their* event loop, so neither loop is ever blocked by the other. Metadata (``ls``,
``stat``, ``walk``) is answered from the in-memory index on the calling thread.

Integrity is the mount's (README, *Integrity*): whole-file reads (``read_bytes``) verify before
returning; ranged reads follow the verify policy (``lazy``: a large raw file's ranges are served as
read and the read that completes the file raises on a mismatch; ``strict``: verified before the
first byte). An integrity failure raises :class:`~blobmount.errors.IntegrityError`, never returns
wrong bytes as if they were right.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import io
import os
import stat as stat_mod
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from blobmount.errors import BlobmountError, IsADirectory, NotADirectory, NotFound, SourceError, UsageError
from blobmount.index.paths import show

if TYPE_CHECKING:
    import trio

    from blobmount.cache import CacheDir
    from blobmount.index import Entry, IndexView
    from blobmount.reader import Handle, Reader
    from blobmount.registry.options import RegistryOptions
    from blobmount.sources.base import Archive as OpenedSource

__all__ = ["Archive", "Stat", "aopen", "open"]

_P = ParamSpec("_P")
_T = TypeVar("_T")
START_TIMEOUT_S = 30.0  # hang guard for the engine thread's start (it only builds objects)


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


class _Engine:
    """One trio loop on a daemon thread: the archive's data source, reader and their nursery."""

    def __init__(self, opened: OpenedSource, cache: CacheDir | None, verify: str, verify_threshold: int) -> None:
        self._opened = opened
        self._cache = cache
        self._verify = verify
        self._threshold = verify_threshold
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.reader: Reader | None = None
        self._thread = threading.Thread(target=self._run, name="blobmount-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise SourceError("the archive's I/O thread did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        import trio

        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by __init__ when it happens before ready
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        import contextlib
        import tempfile

        import trio

        from blobmount.cache import ContentStore
        from blobmount.reader import Reader, ReaderConfig
        from blobmount.sources.base import Fetching

        data = self._opened.data
        with contextlib.ExitStack() as sync_stack:
            if self._cache is not None:
                store = ContentStore(self._cache)
            else:  # no cache directory: decoded files live in a private temp dir for our life
                tmp = sync_stack.enter_context(tempfile.TemporaryDirectory(prefix="blobmount-api-"))
                os.chmod(tmp, 0o700)
                store = ContentStore(Path(tmp), max_bytes=1 << 62)
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if isinstance(data, Fetching):
                        await stack.enter_async_context(data.serving())
                    nursery = await stack.enter_async_context(trio.open_nursery())
                    reader = Reader(data, store, ReaderConfig(self._verify, self._threshold))  # type: ignore[arg-type]
                    reader.attach(nursery)
                    self.reader = reader
                    self._stop = trio.Event()
                    self._token = trio.lowlevel.current_trio_token()
                    self._ready.set()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await data.aclose()
                data.close()

    def call(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        import trio

        if self._token is None or not self._thread.is_alive():
            raise SourceError("the archive is closed")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        import trio

        if self._token is not None and self._stop is not None and self._thread.is_alive():
            stop = self._stop
            trio.from_thread.run_sync(stop.set, trio_token=self._token)
            self._thread.join(START_TIMEOUT_S)
        self._token = None


async def _in_worker(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run a blocking call off the caller's event loop, whichever it is (trio or asyncio)."""
    import sniffio

    call = functools.partial(fn, *args, **kwargs)
    if sniffio.current_async_library() == "trio":
        import trio

        return await trio.to_thread.run_sync(call)
    return await asyncio.get_running_loop().run_in_executor(None, call)


class Archive:
    """An opened blob archive (see the module docstring). Use as a context manager, or close()."""

    def __init__(self, opened: OpenedSource, view: IndexView, engine: _Engine) -> None:
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
        return await _in_worker(self.read_bytes, path)

    async def aread_range(self, path: str | bytes | os.PathLike[str], start: int, end: int) -> bytes:
        return await _in_worker(self.read_range, path, start, end)

    async def aclose(self) -> None:
        await _in_worker(self.close)


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


def open(  # the module's one verb, as in `blobmount.open(SOURCE)`
    source: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_size: int | None = None,
    verify: Literal["lazy", "strict", "background"] = "lazy",
    verify_threshold: int | None = None,
    offline: bool = False,
    registry: RegistryOptions | None = None,
    plain_http: tuple[str, ...] | list[str] = (),
    timeout: float | None = None,
) -> Archive:
    """Open SOURCE: a registry reference, ``oci:PATH[:TAG]``, a local archive directory (``/…``,
    ``./…``, ``dir:…``, or any :class:`os.PathLike`).

    `cache_dir` is the mounts' cache (shared with them: same chunks, same single flight); None uses
    no disk cache for a registry source (chunks in memory for the Archive's life). `registry`
    gives every registry option (credentials, mirrors, TLS); `plain_http` and `timeout` are
    shortcuts for the two most used. The index is verified against the manifest before this
    returns, as before a mount answers its first stat."""
    from blobmount.cache import DEFAULT_CACHE_SIZE_BYTES, CacheDir
    from blobmount.index import IndexView
    from blobmount.reader import DEFAULT_VERIFY_THRESHOLD_BYTES
    from blobmount.registry.options import RegistryOptions
    from blobmount.sources import RemoteSettings, open_archive

    if verify not in ("lazy", "strict", "background"):
        raise UsageError(f"verify={verify!r}: expected 'lazy', 'strict' or 'background'")
    # A path object is a local archive whatever it looks like; a string follows the CLI's SOURCE
    # grammar (a bare relative name is a registry reference there, so it is here).
    spec = source if isinstance(source, str) else "dir:" + os.path.abspath(os.fspath(source))
    options = registry or RegistryOptions()
    if plain_http or timeout is not None:
        import dataclasses

        changes: dict[str, Any] = {}
        if plain_http:
            changes["plain_http"] = tuple(options.plain_http) + tuple(plain_http)
        if timeout is not None:
            changes["timeout_s"] = float(timeout)
        options = dataclasses.replace(options, **changes)
    cache = CacheDir(Path(cache_dir), cache_size or DEFAULT_CACHE_SIZE_BYTES) if cache_dir is not None else None
    opened = open_archive(spec, options, RemoteSettings(cache, None, offline))
    try:
        view = IndexView(opened.index_bytes, blob_size=opened.data.size)
        engine = _Engine(opened, cache, verify, verify_threshold or DEFAULT_VERIFY_THRESHOLD_BYTES)
    except BaseException:
        opened.data.close()
        raise
    return Archive(opened, view, engine)


def _blocking(fn: Callable[_P, _T]) -> Callable[_P, Awaitable[_T]]:
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await _in_worker(fn, *args, **kwargs)

    return functools.wraps(fn)(wrapper)


aopen = _blocking(open)
aopen.__doc__ = "`open` for trio and asyncio callers (the opening runs on a worker thread)."
