"""The Python API: ``blobmount.open(SOURCE) -> Archive``, read-only, without FUSE.

It is the mount's data path without the kernel: the same SOURCE syntax and opening code
(sources/), the same index view, and the same :class:`~blobmount.reader.Reader` with the same
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

The package: :mod:`.archive` (Archive, Stat, file objects), :mod:`.engine` (the I/O thread);
:func:`open` here builds them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from blobmount.api.archive import Archive, Stat
from blobmount.api.engine import Engine, in_worker
from blobmount.errors import UsageError

if TYPE_CHECKING:
    from blobmount.registry.options import RegistryOptions

__all__ = ["Archive", "Stat", "aopen", "open"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


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
        engine = Engine(opened, cache, verify, verify_threshold or DEFAULT_VERIFY_THRESHOLD_BYTES)
    except BaseException:
        opened.data.close()
        raise
    return Archive(opened, view, engine)


def _blocking(fn: Callable[_P, _T]) -> Callable[_P, Awaitable[_T]]:
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await in_worker(fn, *args, **kwargs)

    return functools.wraps(fn)(wrapper)


aopen = _blocking(open)
aopen.__doc__ = "`open` for trio and asyncio callers (the opening runs on a worker thread)."
