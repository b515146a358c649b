"""Verified records: which large files a remote source verified, with the chunks they were read from.

Why: hashing a multi-GB file again after every remount costs a full read. When a file checks out,
its range, its sha256 and the xxh3 of every chunk it was read from (the chunk files' trailers) go to
the meta store; a later mount trusts the file without hashing it only while every one of those
chunks is still the one that was verified, and the fetcher is told their digests so a refetch
that brings different bytes is refused (fetch.py, ``ChunkedSource.expect``). Only a verified file
leaves a record ("Trust first"): the chunks of a file that did not verify are never vouched for.

Concurrency: called from the trio thread; the meta store and the chunk trailers are read on worker
threads, which touch nothing else.
"""

from __future__ import annotations

from array import array

import trio

from blobmount.sources.base import Fetching


class VerifiedRecords:
    """The verified records of one remote data blob (module docstring)."""

    def __init__(self, source: Fetching) -> None:
        self.source = source

    async def was_verified(self, start: int, end: int, sha256: bytes) -> bool:
        """Whether these bytes were verified against `sha256` before (this or an earlier mount) and
        every chunk under them is still the one that was verified. If so, those chunks may no
        longer change: a refetch that brings different bytes is refused."""
        meta, store = self.source.meta, self.source.store
        if meta is None or start >= end:
            return False
        cs = store.chunk_size
        record = await trio.to_thread.run_sync(meta.get_verified, store.blob_hex, start, end - start, sha256, cs)
        if record is None or len(record) != (end - 1) // cs - start // cs + 1:
            return False
        first = start // cs
        current = await trio.to_thread.run_sync(self._trailer_digests, first, first + len(record) - 1)
        if current is None or current != record:
            return False
        self.source.expect(first, record)
        return True

    async def remember(self, start: int, end: int, sha256: bytes) -> None:
        """Record that [start, end) hashed to `sha256`, with the chunks it was read from."""
        meta, store = self.source.meta, self.source.store
        if meta is None or start >= end:
            return
        cs = store.chunk_size
        first, last = start // cs, (end - 1) // cs
        # A file read straight through is hashed to its end as its last chunks land, before their
        # writes do: without this wait their trailers were missing and no record was left.
        await self.source.saved(first, last)
        digests = await trio.to_thread.run_sync(self._trailer_digests, first, last)
        if digests is None:
            return  # some chunk lives in memory only (disk full, or its write outlasted --timeout)
        self.source.expect(first, digests)
        await trio.to_thread.run_sync(meta.put_verified, store.blob_hex, start, end - start, sha256, cs, digests)

    def _trailer_digests(self, first: int, last: int) -> array[int] | None:
        """Worker thread: the xxh3 of chunks first..last from their files' trailers (None: one is
        not on disk)."""
        store = self.source.store
        out = array("Q")
        for index in range(first, last + 1):
            digest = store.trailer_digest(index)
            if digest is None:
                return None
            out.append(digest)
        return out
