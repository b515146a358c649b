"""Which bytes of the data blob hold a set of paths, for ``blobmount prefetch`` and ``--prefetch``.

The data blob follows the stored entry order, so a directory is usually one contiguous range
(IndexView.data_span) and a whole subtree costs one request per ``fill`` run; files are their own
stored ranges. Ranges are merged where they touch, so the fetch layer sees the fewest runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from blobmount.errors import NotFound
from blobmount.index import IndexView
from blobmount.index.paths import show


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
