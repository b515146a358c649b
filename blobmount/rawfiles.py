"""Large raw files: slices of the data blob, one of the reader's strategies.

A raw file larger than ``SMALL_DECODE_BYTES`` is read straight from the source (the fetcher, with
one read-ahead state per open). Verified whole before its first byte when integrity says
*upfront*; otherwise served as read and hashed as the reads arrive (integrity/lazy.py), each open
carrying the file's distrust count so an open made before a mismatch fails from then on.

Concurrency: the trio thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blobmount.integrity import Integrity
from blobmount.readahead import ReadHint
from blobmount.sources.base import RangeSource

if TYPE_CHECKING:
    from blobmount.reader import Handle


class RawFiles:
    """Large raw files (module docstring)."""

    def __init__(self, source: RangeSource, integrity: Integrity) -> None:
        self.source = source
        self.integrity = integrity

    async def open(self, handle: Handle) -> None:
        entry, integrity = handle.entry, self.integrity
        handle.hint = ReadHint(entry.data_offset, entry.data_offset + entry.original_size)
        await integrity.trusted_before(entry)
        if not integrity.upfront(entry):
            handle.generation = integrity.generation_of(entry)
            integrity.lazy.opened(entry)
            integrity.opened(entry)

    async def read(self, handle: Handle, offset: int, end: int) -> bytes:
        entry, integrity = handle.entry, self.integrity
        upfront = integrity.upfront(entry)
        if not upfront:
            integrity.check_generation(entry, handle.generation)
        if entry.number not in integrity.verified and (upfront or entry.number in integrity.suspect):
            await integrity.verify_whole(entry)
        data = await self.source.read_range(entry.data_offset + offset, entry.data_offset + end, handle.hint)
        if not upfront:
            integrity.check_generation(entry, handle.generation)  # distrusted while this read waited: not served
            await integrity.lazy.served(entry, offset, data)
        return data

    def close(self, handle: Handle) -> None:
        if not self.integrity.upfront(handle.entry):
            self.integrity.lazy.closed(handle.entry)
