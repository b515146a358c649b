"""One attempt at a whole file: read (or decode) all of it and check it against its sha256.

The attempts :meth:`blobmount.integrity.Integrity.from_origin` makes and judges: each reads from
the source, raises IntegrityError (or InvalidArchive) when the bytes do not check out, and knows
nothing of what happens then. Called from the trio thread; decoding runs on a worker thread (a
small frame inline), reading the frame through the source (rangestream.py).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import BinaryIO, cast

import trio

from blobmount.cache import ContentStore, StoreUnavailable
from blobmount.decode import decode_frame, frame_input
from blobmount.errors import IntegrityError, LimitExceeded
from blobmount.index import Entry
from blobmount.index.paths import show
from blobmount.readahead import ReadHint
from blobmount.sources.base import RangeSource

BLOCK_BYTES = 1 << 20  # unit of whole-file hashing: bounded memory, few calls


def mismatch(entry: Entry, actual: bytes) -> IntegrityError:
    return IntegrityError(f"{show(entry.path)}: sha256 mismatch: expected {entry.hash.hex()}, got {actual.hex()}")


async def hash_range(source: RangeSource, entry: Entry, start: int, hasher: hashlib._Hash) -> None:
    """Feed bytes [start, end of file) of a raw file to `hasher`, a block at a time."""
    pos = start
    hint = ReadHint(entry.data_offset, entry.data_offset + entry.original_size)
    while pos < entry.original_size:
        end = min(pos + BLOCK_BYTES, entry.original_size)
        block = await source.read_range(entry.data_offset + pos, entry.data_offset + end, hint)
        hasher.update(block)
        pos = end


async def hash_raw(source: RangeSource, entry: Entry) -> None:
    """Hash a raw file whole (in blocks: the bytes are not kept)."""
    hasher = hashlib.sha256()
    await hash_range(source, entry, 0, hasher)
    if hasher.digest() != entry.hash:
        raise mismatch(entry, hasher.digest())


async def read_raw(source: RangeSource, entry: Entry, hint: ReadHint | None) -> bytes:
    """A small raw file's bytes, read in one request and checked."""
    data = await source.read_range(entry.data_offset, entry.data_offset + entry.original_size, hint)
    actual = hashlib.sha256(data).digest()
    if actual != entry.hash:
        raise mismatch(entry, actual)
    return data


async def decode_in_memory(
    source: RangeSource, entry: Entry, hint: ReadHint | None, *, prefetch: bool, inline: bool
) -> bytes:
    """A zstd file decoded into memory and checked. `prefetch`: its frame is fetched first, on
    this thread (the decoder's thread then never waits for the network); `inline`: decoded right
    here (a thread hop costs more than decoding a small frame)."""
    sink = io.BytesIO()
    compressed = None
    if prefetch or inline:
        compressed = await source.read_range(entry.data_offset, entry.data_offset + entry.data_size, hint)
    stream = frame_input(entry, source, compressed)
    if inline:
        decode_frame(entry, stream, sink)
    else:
        await trio.to_thread.run_sync(decode_frame, entry, stream, sink)
    return sink.getvalue()


async def decode_into_store(source: RangeSource, store: ContentStore, entry: Entry, *, or_hash: bool = False) -> None:
    """A zstd file decoded into the content store, committed only once it checked out.
    `or_hash`: a file the store cannot take is decoded and checked without keeping its bytes
    (else StoreUnavailable or LimitExceeded reach the caller)."""
    stream = frame_input(entry, source, keep=False)  # the store keeps it: its frame need not be

    def decode(tmp: Path) -> None:
        with open(tmp, "r+b") as out:  # pre-sized by the content store
            decode_frame(entry, stream, out)

    try:
        await store.fill(entry.hash.hex(), entry.original_size, decode)
    except (StoreUnavailable, LimitExceeded):
        if not or_hash:
            raise
        stream = frame_input(entry, source)  # only hashed: its frame's chunks are kept
        await trio.to_thread.run_sync(decode_frame, entry, stream, cast(BinaryIO, _Discard()))


class _Discard(io.RawIOBase):
    """A sink that keeps nothing: a file too large for the store is only hashed when rechecked."""

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        return len(b)
