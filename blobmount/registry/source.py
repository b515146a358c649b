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

from blobmount.errors import BlobmountError, LimitExceeded, SourceError, TransientError
from blobmount.manifest import MAX_INDEX_BYTES, parse_manifest
from blobmount.reference import Digest, Reference
from blobmount.registry.client import RangeNotSupported, RegistryClient, RegistryOptions
from blobmount.registry.mirrors import Endpoints
from blobmount.source import Archive, LocalFileSource, RangeSource

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
        self._endpoints: Endpoints | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def endpoints(self) -> Endpoints:
        if self._endpoints is None:
            self._endpoints = Endpoints(self.ref, self.options)
        return self._endpoints

    @property
    def client(self) -> RegistryClient:
        """The origin's client (its stats count the requests that reached the origin)."""
        return self.endpoints.origin

    async def read_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) from the first endpoint that answers (mirrors, then the origin); the
        whole call, retries included, is bounded by ``--timeout`` so that no FUSE request waits
        forever (it becomes EIO, and a later read tries afresh)."""
        if not 0 <= start <= end <= self._size:
            raise SourceError(f"{self.ref}: range {start}..{end} outside the {self._size}-byte data blob")
        with trio.move_on_after(self.options.timeout_s):
            return await self.endpoints.first(lambda c: c.read_range(self.digest, start, end, self._size))
        raise TransientError(f"{self.ref}: no answer within --timeout {self.options.timeout_s:g} s")

    def close(self) -> None:
        """Sockets go with the process; the async clients are closed by :meth:`aclose` when possible."""

    async def aclose(self) -> None:
        if self._endpoints is not None:
            await self._endpoints.aclose()
            self._endpoints = None


async def open_registry(
    spec: str, options: RegistryOptions, *, cache_dir: Path | None = None, cache_size: int = 0
) -> Archive:
    """Resolve, fetch and check manifest and index; return the archive with its data source."""
    ref = Reference.parse(spec)
    endpoints = Endpoints(ref, options)
    try:
        with trio.fail_after(options.timeout_s * 4):  # the whole open: a few round trips per endpoint
            digest = await endpoints.first(lambda c: c.resolve(), resolve=True)
            manifest = await endpoints.first(lambda c: c.get_manifest(digest))
            (idigest, isize), (ddigest, dsize) = parse_manifest(manifest, str(ref))
            data_digest = Digest.parse(ddigest)
            index, probe_error = await _index_and_probe(endpoints, Digest.parse(idigest), isize, data_digest, dsize)
            log.info("%s: pinned to %s (index %d bytes, data %d bytes)", ref, digest, isize, dsize)
            data: RangeSource = RegistryBlobSource(ref, options, data_digest, dsize)
            if isinstance(probe_error, RangeNotSupported):
                data = await _whole_blob_fallback(endpoints.origin, data_digest, dsize, cache_dir, cache_size)
            elif probe_error is not None:
                raise probe_error
    except trio.TooSlowError:
        raise SourceError(f"{ref}: registry did not answer within {options.timeout_s * 4:.0f} s") from None
    finally:
        await endpoints.aclose()
    name = f"{ref.registry}/{ref.repository}@{digest}"
    return Archive(name, index, data, idigest)


async def _index_and_probe(
    endpoints: Endpoints, index_digest: Digest, index_size: int, data_digest: Digest, data_size: int
) -> tuple[bytes, BlobmountError | None]:
    """The index blob and a one-byte range of the data blob at the same time (a round trip less
    before the mount is ready). The probe's error is returned, so the index's error is the one
    raised when both fail, and no ExceptionGroup reaches the CLI's one-line errors."""
    probe_error: list[BlobmountError] = []
    index_error: list[BlobmountError] = []
    index = b""

    async def probe() -> None:
        try:
            await endpoints.first(lambda c: c.read_range(data_digest, 0, 1, data_size))
        except BlobmountError as exc:
            probe_error.append(exc)

    async with trio.open_nursery() as nursery:
        if data_size:  # an empty data blob is never requested
            nursery.start_soon(probe)
        try:
            index = await endpoints.first(lambda c: c.get_blob(index_digest, index_size, MAX_INDEX_BYTES))
        except BlobmountError as exc:
            index_error.append(exc)
            nursery.cancel_scope.cancel()
    if index_error:
        raise index_error[0]
    return index, probe_error[0] if probe_error else None


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
