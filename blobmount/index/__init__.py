"""The index blob: reading (:mod:`view`), building (:mod:`build`) and path rules (:mod:`paths`).

This package is the only importer of ``flatbuffers``."""

from blobmount.index.build import EntryRecord, build_index
from blobmount.index.view import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    HASH_SIZE_BYTES,
    Child,
    Entry,
    IndexView,
    Order,
)

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
