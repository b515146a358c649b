"""SOURCE string -> opened :class:`~blobmount.sources.base.Archive`: the one place that reads the
SOURCE syntax (DESIGN §8).

`oci:PATH[:TAG]` is an OCI image layout (oci_layout.py); `dir:PATH` and paths starting with `/`,
`./`, `../` are a directory holding index.blob + data.blob (local.py); anything else is a registry
reference (remote.py: the registry, the meta cache, the range probe, the whole-blob fallback and
the chunk cache in front of the data blob). :func:`kind` says which; everything else here asks it.

Importing this package is cheap on purpose (the heavy imports happen inside the functions): the
mount starts :class:`Opening` first thing, so that the registry's round trips overlap with the
imports only the daemon needs (pyfuse3, the reader).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from blobmount.errors import UsageError
from blobmount.registry.options import RegistryOptions

if TYPE_CHECKING:
    from blobmount.cache import CacheDir
    from blobmount.sources.base import Archive

HEAD_START_WAIT_S = 10.0  # hang guard only: the opener's imports take ~0.1 s

SourceKind = Literal["oci", "dir", "registry"]


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    """How remote data is cached and fetched (from the mount's flags)."""

    cache: CacheDir | None = None
    chunk_size: int | None = None  # None: the chunk store's default
    offline: bool = False
    stale_tag: bool = True  # the registry does not answer: open the tag's last resolution (cached)


def kind(spec: str) -> SourceKind:
    """What a SOURCE names: an OCI layout, a local directory, or (anything else) a registry
    reference. A bare relative name is a reference: write a directory as ./name or dir:name (one that
    exists is refused with that hint: :func:`refuse_local_lookalike`)."""
    if spec.startswith("oci:"):
        return "oci"
    if spec.startswith(("dir:", "/", "./", "../")) or spec in (".", ".."):
        return "dir"
    return "registry"


def is_local(spec: str) -> bool:
    return kind(spec) != "registry"


def refuse_local_lookalike(spec: str) -> None:
    """A registry reference that names no registry host (Docker Hub) but spells an existing local
    directory, such as ``tests/fixtures/x``, was almost surely meant as that directory: refused in
    one line with the spelling that means it, before any request (the registry's error would name
    Docker Hub and nothing about the directory)."""
    from blobmount.reference import written_host

    if kind(spec) == "registry" and written_host(spec) is None and os.path.isdir(spec):
        raise UsageError(f"{spec!r} is a registry reference, but a local directory of that name exists: write ./{spec}")


def open_local(spec: str) -> Archive:
    """Open a local SOURCE: `oci:PATH[:TAG]`, `dir:PATH`, or a path starting with `/`, `./` or
    `../`. A registry reference is refused (the caller has no registry to offer)."""
    what = kind(spec)
    if what == "oci":
        from blobmount.sources.oci_layout import open_oci_layout

        return open_oci_layout(spec.removeprefix("oci:"))
    if what == "dir":
        from blobmount.sources.local import open_directory

        return open_directory(Path(spec.removeprefix("dir:")))
    raise UsageError(
        f"{spec!r} is a registry reference; this build reads local archives only"
        " (write a local directory as /path, ./path or dir:path, an OCI layout as oci:path[:tag])"
    )


def open_archive(spec: str, options: RegistryOptions | None = None, settings: RemoteSettings | None = None) -> Archive:
    """Open SOURCE from synchronous code (the CLI, the mount's parent process)."""
    if is_local(spec):
        return open_local(spec)
    refuse_local_lookalike(spec)
    import trio

    from blobmount.sources.remote import open_remote

    return trio.run(open_remote, spec, options or RegistryOptions(), settings or RemoteSettings())


async def open_source(
    spec: str, options: RegistryOptions | None = None, settings: RemoteSettings | None = None
) -> Archive:
    """Open SOURCE from the event loop (a local one on a worker thread: it reads files)."""
    if is_local(spec):
        import trio

        return await trio.to_thread.run_sync(open_local, spec)
    refuse_local_lookalike(spec)
    from blobmount.sources.remote import open_remote

    return await open_remote(spec, options or RegistryOptions(), settings or RemoteSettings())


class Opening:
    """The cache directory and :func:`open_archive` on a background thread. While it waits on the
    network (the GIL is released), the main thread goes on importing and checking what the mount
    needs; `result()` joins it, before the mount forks, and raises what opening raised."""

    def __init__(
        self,
        spec: str,
        options: RegistryOptions,
        *,
        cache_dir: Path | None,
        cache_size: int,
        chunk_size: int | None = None,
        offline: bool = False,
        stale_tag: bool = True,
    ) -> None:
        self._spec, self._options = spec, options
        self._cache_args = (cache_dir, cache_size, chunk_size, offline, stale_tag)
        self.cache: CacheDir | None = None
        self._archive: Archive | None = None
        self._error: BaseException | None = None
        self._talking = threading.Event()
        # a daemon thread: when the mount gives up first (a bad mountpoint), exiting does not wait
        self._thread = threading.Thread(target=self._run, name="blobmount-open", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cache_dir, cache_size, chunk_size, offline, stale_tag = self._cache_args
        try:
            if not is_local(self._spec):
                import blobmount.sources.remote  # noqa: F401  the HTTP stack, before the first request
            from blobmount.cache import CacheDir, default_cache_dir

            self.cache = CacheDir(cache_dir or default_cache_dir(), cache_size)
            self._talking.set()
            settings = RemoteSettings(self.cache, chunk_size, offline, stale_tag)
            self._archive = open_archive(self._spec, self._options, settings)
        except BaseException as exc:  # handed to the main thread by result()
            self._error = exc
        finally:
            self._talking.set()

    def wait_talking(self, timeout_s: float = HEAD_START_WAIT_S) -> None:
        """Until the thread has its imports and sends its first request. Imports hold the GIL, so
        importing in both threads at once only delays that request; importing the rest while the
        thread waits on the network overlaps the two."""
        self._talking.wait(timeout_s)

    def result(self) -> tuple[Archive, CacheDir]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._archive is not None
        assert self.cache is not None
        return self._archive, self.cache
