"""What every opened archive is, whatever its SOURCE: the index bytes and the data blob behind the
:class:`RangeSource` protocol, plus the one optional capability a source may add (:class:`Fetching`).

Everything above sources/ sees a :class:`RangeSource`: ``size`` plus ``read_range(start, end,
hint)``. Local sources also offer ``read_range_sync`` so code already running on a worker thread
(the zstd decoder) reads without hopping back to the event loop. A remote data blob is read through
the chunk cache (fetch.py), which is :class:`Fetching`: callers that start its background fetches,
prefetch or ask what is cached test for that protocol, never for the fetcher's class.

Cheap to import on purpose (no trio, no cache): the CLI imports it before the mount's heavy parts.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import trio

    from blobmount.cache import ChunkStore, MetaStore
    from blobmount.fetch_runs import FetchStats
    from blobmount.readahead import ReadHint


@runtime_checkable
class RangeSource(Protocol):
    """Random access to the data blob. `read_range` returns exactly ``end - start`` bytes or raises
    SourceError; it is never asked for bytes past `size`."""

    @property
    def size(self) -> int: ...

    async def read_range(self, start: int, end: int, hint: ReadHint | None = None) -> bytes: ...

    def close(self) -> None: ...

    async def aclose(self) -> None:
        """Release what needs the event loop (network clients); `close` does the rest."""


@runtime_checkable
class SyncRangeSource(RangeSource, Protocol):
    """A source cheap enough to read from a worker thread directly (a local file)."""

    def read_range_sync(self, start: int, end: int) -> bytes: ...


@runtime_checkable
class Fetching(RangeSource, Protocol):
    """A source that fetches over the network into a chunk cache (fetch.ChunkedSource): it needs a
    nursery for its fetches, and it can fill the cache ahead of readers, say what the host already
    holds, and forget bytes that failed verification. A local file has none of this to offer."""

    offline: bool
    stats: FetchStats
    meta: MetaStore | None  # where verified records live (integrity/records.py)

    @property
    def store(self) -> ChunkStore: ...

    def attach(self, nursery: trio.Nursery) -> None: ...

    def serving(self) -> AbstractAsyncContextManager[object]: ...

    async def fill(
        self,
        ranges: list[tuple[int, int]],
        progress: Callable[[int, int], None] | None = None,
        *,
        ahead: bool = False,
        request_bytes: int | None = None,
    ) -> int: ...

    def prefetch(self, start: int, end: int, *, request_bytes: int | None = None) -> None: ...

    def cached_bytes(self, start: int, end: int) -> int: ...

    async def purge(self, start: int, end: int) -> None: ...

    async def saved(self, first: int, last: int) -> None: ...

    def expect(self, first: int, digests: Sequence[int]) -> None: ...

    async def pieces_agree(self, start: int, end: int) -> bool: ...

    async def drop_pieces(self, start: int, end: int) -> None: ...


@runtime_checkable
class StreamSource(Protocol):
    """A remote data blob that streams byte ranges (remote.py implements it; fetch.ChunkedSource reads it)."""

    @property
    def size(self) -> int: ...

    def iter_range(self, start: int, end: int, *, origin_only: bool = False) -> AsyncGenerator[bytes, None]:
        """Exactly the bytes [start, end), in blocks; raises SourceError (TransientError when
        worth retrying) instead of yielding anything wrong. `origin_only` skips mirrors."""
        ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Archive:
    """An opened archive: the index bytes (already checked against their digest where one is
    known) and the data blob's source."""

    name: str
    index_bytes: bytes
    data: RangeSource
    index_digest: str  # "sha256:<hex>"
    # when the archive was made, dating directories with no file of their own (fs.py): the
    # manifest's created annotation, a local index.blob's mtime; None when neither says
    created_ns: int | None = None
