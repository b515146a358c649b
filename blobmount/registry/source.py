"""Opening an archive by registry reference, and the data blob as a range source.

Pull side (issue: registries): resolve the tag once (HEAD, GET when HEAD is refused), fetch the
manifest by digest and check ``sha256(body)``, check it is a blob archive (source.parse_manifest),
fetch the index and check digest and size, then probe the data blob with a one-byte range: a
registry that answers ranges with the whole body is detected here, at mount time, and the whole blob
is downloaded (verified against its digest) into the cache when it fits ``--cache-size``; otherwise
the mount is refused with a clear error. An empty data blob is never requested.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from blobmount.errors import LimitExceeded, SourceError, TransientError
from blobmount.reference import Digest, Reference
from blobmount.registry.client import RangeNotSupported, RegistryClient, RegistryOptions
from blobmount.source import MAX_INDEX_BYTES, Archive, LocalFileSource, RangeSource, parse_manifest

log = logging.getLogger(__name__)


class RegistryBlobSource:
    """The data blob in a registry, read with range requests. The HTTP client is created on first
    use inside the running trio loop (the mount forks after the index is fetched)."""

    verified_digest = True  # bytes are requested by digest; files are still verified by sha256

    def __init__(self, ref: Reference, options: RegistryOptions, digest: Digest, size: int) -> None:
        self.ref = ref
        self.options = options
        self.digest = digest
        self._size = size
        self._client: RegistryClient | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = RegistryClient(self.ref, self.options)
        return self._client

    async def read_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end); the whole call, retries included, is bounded by ``--timeout`` so that
        no FUSE request waits forever (it becomes EIO, and a later read tries afresh)."""
        if not 0 <= start <= end <= self._size:
            raise SourceError(f"{self.ref}: range {start}..{end} outside the {self._size}-byte data blob")
        with trio.move_on_after(self.options.timeout_s):
            return await self.client.read_range(self.digest, start, end, self._size)
        raise TransientError(f"{self.ref}: no answer within --timeout {self.options.timeout_s:g} s")

    def close(self) -> None:
        """Sockets go with the process; the async client is closed by :meth:`aclose` when possible."""

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def open_registry(
    spec: str, options: RegistryOptions, *, cache_dir: Path | None = None, cache_size: int = 0
) -> Archive:
    """Resolve, fetch and check manifest and index; return the archive with its data source."""
    ref = Reference.parse(spec)
    client = RegistryClient(ref, options)
    try:
        with trio.fail_after(options.timeout_s * 4):  # the whole open: a few round trips
            digest = await client.resolve()
            manifest = await client.get_manifest(digest)
            (idigest, isize), (ddigest, dsize) = parse_manifest(manifest, str(ref))
            index = await client.get_blob(Digest.parse(idigest), isize, MAX_INDEX_BYTES)
            data_digest = Digest.parse(ddigest)
            log.info("%s: pinned to %s (index %d bytes, data %d bytes)", ref, digest, isize, dsize)
            data: RangeSource = RegistryBlobSource(ref, options, data_digest, dsize)
            if dsize:
                try:
                    await client.read_range(data_digest, 0, 1, dsize)
                except RangeNotSupported:
                    data = await _whole_blob_fallback(client, data_digest, dsize, cache_dir, cache_size)
    except trio.TooSlowError:
        raise SourceError(f"{ref}: registry did not answer within {options.timeout_s * 4:.0f} s") from None
    finally:
        await client.aclose()
    name = f"{ref.registry}/{ref.repository}@{digest}"
    return Archive(name, index, data, idigest)


async def _whole_blob_fallback(
    client: RegistryClient, digest: Digest, size: int, cache_dir: Path | None, cache_size: int
) -> LocalFileSource:
    if cache_dir is None or size > cache_size:
        raise LimitExceeded(
            f"{client.ref}: the registry ignores range requests and the {size}-byte data blob does not fit"
            f" the {cache_size}-byte cache (--cache-size)"
        )
    target = cache_dir / "blobs" / "sha256" / digest.hex
    if not target.exists():
        log.warning(
            "%s: the registry ignores range requests; downloading the whole %d-byte data blob into the cache",
            client.ref,
            size,
        )
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = target.with_name(f"{digest.hex}.{os.getpid()}.tmp")
        try:
            async with await trio.open_file(tmp, "wb") as out:
                async for block in client.stream_blob(digest, size):
                    await out.write(block)
                await out.flush()
                await trio.to_thread.run_sync(os.fsync, out.fileno())
            os.rename(tmp, target)  # only after stream_blob verified the digest
        finally:
            tmp.unlink(missing_ok=True)
    return LocalFileSource(target)
