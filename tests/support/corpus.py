"""Archives laid out by hand for fault, hostile-input and load tests.

`blobmount create` (blobmount/create/) makes honest archives from directories; these tests need what it
never writes: entries in a chosen order with chosen neighbours in the data blob (so a fault can be
aimed at one file's bytes), and entries whose fields lie (offsets, sizes, hashes, modes, frames
that decode past their size). Each :class:`Spec` states the truth and, optionally, the lie.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from blobmount.index import COMPRESSION_NONE, COMPRESSION_ZSTD, EntryRecord, build_index

ZSTD_LEVEL = 3


@dataclass(frozen=True, slots=True)
class Spec:
    """One entry. `data` is the file's content; the other fields, when set, override what an honest
    writer would record (None: the honest value)."""

    path: bytes
    data: bytes = b""
    zstd: bool = False
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 1_700_000_000_000_000_000
    stored: bytes | None = None  # bytes written to the data blob instead of data (or its frame)
    data_offset: int | None = None  # point elsewhere in the blob (nothing is written for it)
    data_size: int | None = None
    original_size: int | None = None
    hash: bytes | None = None


@dataclass(frozen=True, slots=True)
class Placed:
    """Where an entry's stored bytes ended up, and what a correct read returns."""

    path: bytes
    data: bytes
    data_offset: int
    data_size: int


def compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(data)


def bomb_frame(decoded_bytes: int) -> bytes:
    """A valid zstd frame of `decoded_bytes` zeros (without a content size in its header, as a
    streaming writer leaves it): a few KiB that inflate to anything."""
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=False)
    zeros = bytes(1 << 20)
    with cctx.stream_writer(out, closefd=False) as writer:
        for _ in range(decoded_bytes >> 20):
            writer.write(zeros)
        writer.write(bytes(decoded_bytes & ((1 << 20) - 1)))
    return out.getvalue()


def write_archive(out: Path, specs: Iterable[Spec]) -> dict[bytes, Placed]:
    """Write OUT/index.blob and OUT/data.blob with the entries in the given order; return where
    each entry's bytes are."""
    out.mkdir(parents=True, exist_ok=True)
    records: list[EntryRecord] = []
    placed: dict[bytes, Placed] = {}
    hasher = hashlib.sha256()
    pos = 0
    with open(out / "data.blob", "wb") as blob:
        for s in specs:
            stored = s.stored if s.stored is not None else compress(s.data) if s.zstd else s.data
            if s.data_offset is None:
                offset = pos
                blob.write(stored)
                hasher.update(stored)
                pos += len(stored)
            else:
                offset = s.data_offset
            size = s.data_size if s.data_size is not None else len(stored)
            records.append(
                EntryRecord(
                    path=s.path,
                    data_offset=offset,
                    data_size=size,
                    original_size=s.original_size if s.original_size is not None else len(s.data),
                    hash=s.hash if s.hash is not None else hashlib.sha256(s.data).digest(),
                    mode=s.mode,
                    uid=s.uid,
                    gid=s.gid,
                    mtime_ns=s.mtime_ns,
                    compression=COMPRESSION_ZSTD if s.zstd else COMPRESSION_NONE,
                )
            )
            placed[s.path] = Placed(s.path, s.data, offset, size)
    (out / "index.blob").write_bytes(build_index(records, pos, hasher.digest()))
    return placed
