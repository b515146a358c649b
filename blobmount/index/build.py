"""Building index bytes for the writer, with the generated FlatBuffers builders.

The build order reproduces the reference implementation's so that an uncompressed archive of a tree
whose names need no reordering is byte-identical to the reference's (docs/FORMAT.md, "Building an
index byte for byte like the reference"): entries from last to first, each as path string, hash
vector, then the table with its fields in slot order; then the entries vector, the ``data_hash``
vector and the Index table; plain ``Finish``.
Fields equal to their defaults are omitted, as the reference omits them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import flatbuffers

from blobmount.index._fb import index_generated as fb


@dataclass(frozen=True, slots=True)
class EntryRecord:
    """What the writer knows about one file once it is stored."""

    path: bytes
    data_offset: int
    data_size: int
    original_size: int
    hash: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    compression: int


def build_index(entries: Sequence[EntryRecord], data_size: int, data_hash: bytes) -> bytes:
    """Serialize `entries` (already in final order) into index bytes."""
    builder = flatbuffers.Builder(1024 + 128 * len(entries))
    offsets = []
    for e in reversed(entries):
        path = builder.CreateString(e.path)
        digest = builder.CreateByteVector(e.hash)
        fb.EntryStart(builder)
        fb.EntryAddPath(builder, path)
        fb.EntryAddDataOffset(builder, e.data_offset)
        fb.EntryAddDataSize(builder, e.data_size)
        fb.EntryAddOriginalSize(builder, e.original_size)
        fb.EntryAddHash(builder, digest)
        fb.EntryAddMode(builder, e.mode)
        fb.EntryAddUid(builder, e.uid)
        fb.EntryAddGid(builder, e.gid)
        fb.EntryAddMtimeNs(builder, e.mtime_ns)
        fb.EntryAddCompression(builder, e.compression)
        offsets.append(fb.EntryEnd(builder))
    offsets.reverse()
    fb.IndexStartEntriesVector(builder, len(offsets))
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    vector = builder.EndVector()
    hash_vec = builder.CreateByteVector(data_hash)
    fb.IndexStart(builder)
    fb.IndexAddEntries(builder, vector)
    fb.IndexAddDataSize(builder, data_size)
    fb.IndexAddDataHash(builder, hash_vec)
    builder.Finish(fb.IndexEnd(builder))
    return bytes(builder.Output())
