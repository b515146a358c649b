"""Reading a registry data blob the two ways blobmount does: through the fetcher (the mount's data
path: its --timeout deadline, its one retry loop) and as one streamed range request (what the
fetcher sends), for tests of the registry source below the chunk cache."""

from __future__ import annotations

from contextlib import aclosing

from blobmount.cache import ChunkStore
from blobmount.errors import BlobmountError
from blobmount.fetch import ChunkedSource
from blobmount.sources.remote import RegistryBlobSource


async def read_streamed(source: RegistryBlobSource, start: int, end: int) -> bytes:
    """Bytes [start, end) from one range request (mirrors first, as the fetcher asks)."""
    async with aclosing(source.iter_range(start, end)) as blocks:
        return b"".join([block async for block in blocks])


async def read_fetched(remote: RegistryBlobSource, start: int, end: int, timeout_s: float) -> bytes:
    """Bytes [start, end) through a memory-only fetcher whose chunk is exactly the range asked for,
    so that a test server answering that range answers the fetcher's request. An error is raised
    as a FUSE handler sees it (not grouped by the fetcher's nursery)."""
    assert start % (end - start) == 0, "the range must be one whole chunk"
    source = ChunkedSource(remote, ChunkStore(None, remote.digest.hex, remote.size, end - start), timeout_s=timeout_s)
    failed: BlobmountError | None = None
    async with source.serving():
        try:
            return await source.read_range(start, end)
        except BlobmountError as exc:
            failed = exc
    assert failed is not None
    raise failed
