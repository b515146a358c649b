"""`cp` from a SOURCE string: the archive opened (a local directory as it is; a registry archive
through the chunk cache, as a mount would), DEST refused early when ``--clean-dest`` may not empty
it, the plan made, the files copied, the source closed. The command line only reads flags and
prints the result."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from blobmount.extract.copy import copy_items, first_error
from blobmount.extract.dest import check_clean_dest
from blobmount.extract.options import CopyOptions, CopyResult
from blobmount.extract.plan import plan

if TYPE_CHECKING:
    from blobmount.config import CacheConfig
    from blobmount.registry.options import RegistryOptions


def check_dest(dest: bytes, options: CopyOptions, cache: CacheConfig) -> None:
    """What can be refused before the archive is even opened (``--clean-dest`` of `/`, of the
    working directory's ancestors, of anything overlapping the cache directory)."""
    if options.clean_dest:
        check_clean_dest(dest, _cache_dir(cache))


async def copy_archive(
    source: str,
    paths: Sequence[bytes],
    dest: bytes,
    options: CopyOptions,
    registry: Callable[[], RegistryOptions],
    cache: CacheConfig,
) -> CopyResult:
    """Copy the files PATHs name from the archive at SOURCE below `dest` (see the package
    docstring); `cache.dir` must be set (the cache a registry archive's chunks go through, and
    the directory ``--clean-dest`` must not overlap). `registry` is asked for the registry options
    only when SOURCE is a registry archive (reading them may read a password from stdin). Raises what :func:`plan` and
    :func:`copy_items` raise, the first error of a failed pipeline rather than its group."""
    from blobmount.cache import CacheDir
    from blobmount.index import IndexView
    from blobmount.sources import RemoteSettings, is_local, open_source
    from blobmount.sources.base import Fetching

    check_dest(dest, options, cache)
    if is_local(source):  # no registry to talk to, no cache directory
        archive = await open_source(source)
    else:
        store = CacheDir(Path(os.fsdecode(_cache_dir(cache))), cache.size_bytes)
        archive = await open_source(source, registry(), RemoteSettings(store, cache.chunk_size))
    data = archive.data
    try:
        view = IndexView(archive.index_bytes, blob_size=data.size)
        try:
            async with contextlib.AsyncExitStack() as stack:
                on_span = None
                if isinstance(data, Fetching):
                    await stack.enter_async_context(data.serving())  # a nursery: errors come grouped
                    remote = data

                    def on_span(start: int, end: int) -> None:
                        # A directory's first half --buffer fetched while its entries are
                        # validated (into the chunk cache; DEST is untouched until the plan
                        # holds), as one request: the copy consumes it in order, and one stream
                        # delivers it in order at full speed where parallel ones finish together.
                        # Half: a piece then waits for at most as many bytes as four readers of
                        # --buffer/4 did (--timeout applies to each read).
                        end = min(end, start + options.buffer_bytes // 2)
                        remote.prefetch(start, end, request_bytes=end - start)

                items = plan(view, paths, on_span)  # nothing written before
                return await copy_items(
                    data, items, dest, options, cache_dir=_cache_dir(cache), created_ns=archive.created_ns
                )
        except BaseExceptionGroup as group:
            raise first_error(group) from None
    finally:
        await data.aclose()
        data.close()


def _cache_dir(cache: CacheConfig) -> bytes:
    if cache.dir is None:
        raise ValueError("cp needs the cache directory resolved (CacheConfig.dir)")
    return os.fsencode(cache.dir)
