"""SOURCE string -> opened :class:`~blobmount.source.Archive`, local or remote (DESIGN §8).

`oci:PATH[:TAG]`, `dir:PATH` and paths starting with `/`, `./`, `../` are local; anything else is a
registry reference. Kept apart from source.py so that the local sources never import registry/.

A remote archive's data blob is returned behind the chunk cache (fetch.ChunkedSource): with a cache
directory the chunks are shared on disk with every process using it; without one (``ls``, ``cat``)
they live in memory for the command's life.

Importing this module is cheap on purpose (the heavy imports happen inside the functions): the
mount starts :class:`Opening` first thing, so that the registry's round trips overlap with the
imports only the daemon needs (pyfuse3, the reader).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from blobmount.registry.options import RegistryOptions

if TYPE_CHECKING:
    from blobmount.cache import CacheDir
    from blobmount.source import Archive

HEAD_START_WAIT_S = 10.0  # hang guard only: the opener's imports take ~0.1 s


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    """How remote data is cached and fetched (from the mount's flags)."""

    cache: CacheDir | None = None
    chunk_size: int | None = None  # None: the chunk store's default
    offline: bool = False
    stale_tag: bool = True  # the registry does not answer: open the tag's last resolution (cached)


def is_local(spec: str) -> bool:
    from blobmount.source import is_local_path

    return spec.startswith(("oci:", "dir:")) or is_local_path(spec)


def open_archive(spec: str, options: RegistryOptions | None = None, settings: RemoteSettings | None = None) -> Archive:
    """Open SOURCE from synchronous code (the CLI, the mount's parent process)."""
    if is_local(spec):
        from blobmount.source import open_local

        return open_local(spec)
    import trio

    return trio.run(open_remote, spec, options or RegistryOptions(), settings or RemoteSettings())


async def open_remote(spec: str, options: RegistryOptions, settings: RemoteSettings) -> Archive:
    from blobmount.cache import DEFAULT_CHUNK_SIZE_BYTES, ChunkStore, MetaStore
    from blobmount.fetch import ChunkedSource
    from blobmount.remote import RegistryBlobSource, open_registry
    from blobmount.source import Archive

    archive = await open_registry(
        spec, options, cache=settings.cache, offline=settings.offline, stale_tag=settings.stale_tag
    )
    remote = archive.data
    if not isinstance(remote, RegistryBlobSource):
        return archive  # a registry that ignores ranges: the whole blob is a local file now
    chunk_size = settings.chunk_size or DEFAULT_CHUNK_SIZE_BYTES
    store = ChunkStore(settings.cache, remote.digest.hex, remote.size, chunk_size)
    meta = MetaStore(settings.cache) if settings.cache is not None else None
    data = ChunkedSource(
        remote,
        store,
        meta=meta,
        timeout_s=options.timeout_s,
        max_requests=options.max_connections,
        offline=settings.offline,
    )
    return Archive(archive.name, archive.index_bytes, data, archive.index_digest, archive.created_ns)


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
                import blobmount.remote  # noqa: F401  the HTTP stack, before the first request
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
