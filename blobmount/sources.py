"""SOURCE string -> opened :class:`~blobmount.source.Archive`, local or remote (DESIGN §8).

`oci:PATH[:TAG]`, `dir:PATH` and paths starting with `/`, `./`, `../` are local; anything else is a
registry reference. Kept apart from source.py so that the local sources never import registry/.

A remote archive's data blob is returned behind the chunk cache (fetch.ChunkedSource): with a cache
directory the chunks are shared on disk with every process using it; without one (``ls``, ``cat``)
they live in memory for the command's life.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from blobmount.cache import DEFAULT_CHUNK_SIZE_BYTES, CacheDir, ChunkStore, MetaStore
from blobmount.fetch import ChunkedSource
from blobmount.registry.client import RegistryOptions
from blobmount.registry.source import RegistryBlobSource, open_registry
from blobmount.source import Archive, is_local_path, open_local


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    """How remote data is cached and fetched (from the mount's flags)."""

    cache: CacheDir | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE_BYTES
    offline: bool = False


def is_local(spec: str) -> bool:
    return spec.startswith(("oci:", "dir:")) or is_local_path(spec)


def open_archive(spec: str, options: RegistryOptions | None = None, settings: RemoteSettings | None = None) -> Archive:
    """Open SOURCE from synchronous code (the CLI, the mount's parent process)."""
    if is_local(spec):
        return open_local(spec)
    return trio.run(open_remote, spec, options or RegistryOptions(), settings or RemoteSettings())


async def open_remote(spec: str, options: RegistryOptions, settings: RemoteSettings) -> Archive:
    archive = await open_registry(spec, options, cache=settings.cache, offline=settings.offline)
    remote = archive.data
    if not isinstance(remote, RegistryBlobSource):
        return archive  # a registry that ignores ranges: the whole blob is a local file now
    store = ChunkStore(settings.cache, remote.digest.hex, remote.size, settings.chunk_size)
    meta = MetaStore(settings.cache) if settings.cache is not None else None
    data = ChunkedSource(
        remote,
        store,
        meta=meta,
        timeout_s=options.timeout_s,
        max_requests=options.max_connections,
        offline=settings.offline,
    )
    return Archive(archive.name, archive.index_bytes, data, archive.index_digest)
