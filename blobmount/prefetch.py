"""Which bytes of the data blob hold a set of paths, for ``blobmount prefetch`` and ``--prefetch``;
and ``blobmount prefetch`` itself (:func:`prefetch_archive`: those bytes fetched into the cache).

The data blob follows the stored entry order, so a directory is usually one contiguous range
(IndexView.data_span) and a whole subtree costs one request per ``fill`` run; files are their own
stored ranges. Ranges are merged where they touch, so the fetch layer sees the fewest runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from blobmount.errors import NotFound, UsageError
from blobmount.index import IndexView
from blobmount.index.paths import show

if TYPE_CHECKING:
    from blobmount.config import CacheConfig
    from blobmount.registry.options import RegistryOptions


def ranges_for(view: IndexView, paths: Iterable[str | bytes]) -> list[tuple[int, int]]:
    """Merged data-blob ranges of `paths` (files or directories; '' or '/' is everything).
    Raises NotFound for a path the index does not have."""
    found: list[tuple[int, int]] = []
    for raw in paths:
        path = (os.fsencode(raw) if isinstance(raw, str) else raw).strip(b"/")
        kind = view.kind(path)
        if kind is None:
            raise NotFound(f"{show(path)}: no such file or directory in the archive")
        if kind >= 0:
            entry = view.entry(kind)
            found.append((entry.data_offset, entry.data_offset + entry.data_size))
            continue
        span = view.data_span(path)
        if span is not None:
            found.append(span)
            continue
        prefix = path + b"/" if path else b""
        for entry in view.entries():
            if entry.path.startswith(prefix):
                found.append((entry.data_offset, entry.data_offset + entry.data_size))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in found if r[0] < r[1]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


async def prefetch_archive(
    source: str,
    paths: Sequence[str],
    registry: Callable[[], RegistryOptions],
    cache: CacheConfig,
    progress: bool | None = None,
) -> tuple[int, int]:
    """Fetch the bytes of `paths` ('' or none: everything) of the registry archive SOURCE into the
    cache directory `cache.dir` (which must be set); (bytes fetched now, bytes they span). A local
    archive is a UsageError: its bytes are on this machine. `progress` None: a progress line on a
    terminal. `registry` is asked once the source is known to be a registry one."""
    from blobmount.cache import CacheDir
    from blobmount.progress import ProgressLine
    from blobmount.sources import RemoteSettings, is_local, open_source
    from blobmount.sources.base import Fetching

    if is_local(source):
        raise UsageError(f"{source}: a local archive needs no prefetch (its bytes are on this machine)")
    if cache.dir is None:
        raise ValueError("prefetch needs the cache directory resolved (CacheConfig.dir)")
    settings = RemoteSettings(CacheDir(cache.dir, cache.size_bytes), cache.chunk_size)
    show_progress = sys.stderr.isatty() if progress is None else progress
    archive = await open_source(source, registry(), settings)
    data = archive.data
    view = IndexView(archive.index_bytes, blob_size=data.size)
    ranges = ranges_for(view, paths or [""])
    total = sum(b - a for a, b in ranges)
    line = ProgressLine("prefetch", total, enabled=show_progress)

    def advance(done: int, whole: int) -> None:
        line.reach(done)

    try:
        if not isinstance(data, Fetching):
            return 0, total  # the whole blob is local already (a registry without ranges)
        async with data.serving():
            fetched = await data.fill(ranges, advance)
        return fetched, total
    finally:
        line.close()
        await data.aclose()
