"""The index blob: its layout (:mod:`format`), reading (:mod:`tables` for the bounds-checked FlatBuffers
reads, :mod:`view` for order, lookup and listing), building (:mod:`build`) and path rules (:mod:`paths`).

This package is the only importer of ``flatbuffers``, and only the builder needs it: `build_index`
and `EntryRecord` are loaded on first use, so reading an index (every mount) never imports it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blobmount.index.format import COMPRESSION_NONE, COMPRESSION_ZSTD, HASH_SIZE_BYTES, Child, Entry, Order
from blobmount.index.view import IndexView

__all__ = [
    "COMPRESSION_NONE",
    "COMPRESSION_ZSTD",
    "HASH_SIZE_BYTES",
    "Child",
    "Entry",
    "EntryRecord",
    "IndexView",
    "Order",
    "build_index",
]

if TYPE_CHECKING:
    from blobmount.index.build import EntryRecord, build_index


def __getattr__(name: str) -> Any:
    if name in ("EntryRecord", "build_index"):
        from blobmount.index import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
