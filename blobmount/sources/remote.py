"""A registry archive: the registry client (registry/) composed with the cache (meta store, whole-blob
fallback, chunk cache). Opening by reference, and the data blob as a streaming range source behind
the chunk cache (fetch.ChunkedSource): with a cache directory the chunks are shared on disk with
every process using it; without one (``ls``, ``cat``) they live in memory for the command's life.

Kept out of registry/ so that the OCI client knows nothing of the cache layout.

Pull side (issue: registries): resolve the tag once (HEAD, GET when HEAD is refused), fetch the
manifest by digest and check ``sha256(body)``, check it is a blob archive (manifest.parse_manifest),
fetch the index and check digest and size. Manifests and index blobs are kept in the cache by
digest (cache/meta.py), so a digest remount needs no request at all and a tag remount one HEAD;
``--offline`` never touches the network (a tag then resolves to the digest it had last time). A tag
lookup the registry does not answer (a TransientError, or silence for ``--timeout``) falls back to
that same remembered digest with one warning, unless ``--no-stale-tag``; an answer such as "no
such tag" is believed.

The data blob is probed once with a one-byte range (and the answer remembered in the cache): a
registry that answers ranges with the whole body is detected here, at mount time, and the whole
blob is downloaded (verified against its digest) into the cache when it fits ``--cache-size``;
otherwise the mount is refused with a clear error. An empty data blob is never requested.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

import trio

from blobmount.cache import DEFAULT_CHUNK_SIZE_BYTES, CacheDir, ChunkStore, MetaStore, WholeBlob
from blobmount.errors import BlobmountError, LimitExceeded, SourceError, TransientError
from blobmount.fetch import ChunkedSource
from blobmount.manifest import MAX_INDEX_BYTES, created_ns, parse_manifest
from blobmount.reference import Digest, Reference
from blobmount.registry.client import RangeNotSupported, RegistryClient, RegistryOptions
from blobmount.registry.mirrors import Endpoints
from blobmount.sources import RemoteSettings
from blobmount.sources.base import Archive
from blobmount.sources.local import LocalFileSource

log = logging.getLogger("blobmount.remote")  # its name before sources/ (JSON logs carry it)
T = TypeVar("T")


class RegistryBlobSource:
    """The data blob in a registry, streamed by range requests (a StreamSource: the chunk cache in
    front of it is what readers see). The HTTP clients are created on first use inside the running
    trio loop (the mount forks after the index is fetched)."""

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

    def _check(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self._size:
            raise SourceError(f"{self.ref}: range {start}..{end} outside the {self._size}-byte data blob")

    async def iter_range(self, start: int, end: int, *, origin_only: bool = False) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) streamed from one request. The first endpoint whose response opens
        (mirrors in order, unless `origin_only`, then the origin) serves it; a body that breaks
        later raises TransientError and the caller resumes from what it received."""
        self._check(start, end)
        if start == end:
            return
        opened = await first_answer(
            self.endpoints,
            lambda c: _opened(c.iter_range(self.digest, start, end, self._size)),
            mirrors=not origin_only,
        )
        blocks, first = opened
        async with aclosing(blocks):
            if first:
                yield first
            async for block in blocks:
                yield block

    def close(self) -> None:
        """Sockets go with the process; the async clients are closed by :meth:`aclose` when possible."""

    async def aclose(self) -> None:
        if self._endpoints is not None:
            await self._endpoints.aclose()
            self._endpoints = None


async def first_answer(
    endpoints: Endpoints, op: Callable[[RegistryClient], Awaitable[T]], *, resolve: bool = False, mirrors: bool = True
) -> T:
    """`op` on the first endpoint that succeeds (mirrors.Endpoints keeps the order and the rests)."""
    for client in endpoints.candidates(resolve=resolve, mirrors=mirrors):
        try:
            return await op(client)
        except BlobmountError as exc:
            endpoints.failed(client, exc)  # raises the origin's error
    raise AssertionError("unreachable: the origin is always tried")  # pragma: no cover


async def _opened(blocks: AsyncGenerator[bytes, None]) -> tuple[AsyncGenerator[bytes, None], bytes]:
    """Start a body: its first block (the response has opened) and the rest still to come."""
    try:
        first = await blocks.__anext__()
    except StopAsyncIteration:
        return blocks, b""
    except BaseException:
        await blocks.aclose()
        raise
    return blocks, first


@dataclass(frozen=True, slots=True)
class RegistryArchive:
    """An archive as :func:`open_registry` pins it: the fields of an Archive, its data blob still as
    the registry serves it (open_remote puts the chunk cache in front), or the whole blob kept in
    the cache when the registry ignores ranges."""

    name: str
    index_bytes: bytes
    data: RegistryBlobSource | LocalFileSource
    index_digest: str
    created_ns: int | None = None


async def open_remote(spec: str, options: RegistryOptions, settings: RemoteSettings) -> Archive:
    """Open a registry reference with its data blob behind the chunk cache (or, from a registry
    that ignores ranges, as the whole blob kept in the cache)."""
    archive = await open_registry(
        spec, options, cache=settings.cache, offline=settings.offline, stale_tag=settings.stale_tag
    )
    remote = archive.data
    if isinstance(remote, LocalFileSource):  # a registry that ignores ranges: the whole blob is here
        return Archive(archive.name, archive.index_bytes, remote, archive.index_digest, archive.created_ns)
    chunk_size = settings.chunk_size or DEFAULT_CHUNK_SIZE_BYTES
    store = ChunkStore(settings.cache, remote.digest.hex, remote.size, chunk_size)
    meta = MetaStore(settings.cache) if settings.cache is not None else None
    data = ChunkedSource(
        remote,
        store,
        meta=meta,
        timeout_s=options.timeout_s,
        max_requests=options.max_connections,
        offline=settings.offline,
    )
    return Archive(archive.name, archive.index_bytes, data, archive.index_digest, archive.created_ns)


async def open_registry(
    spec: str,
    options: RegistryOptions,
    *,
    cache: CacheDir | None = None,
    offline: bool = False,
    stale_tag: bool = True,
) -> RegistryArchive:
    """Resolve, fetch and check manifest and index (from the cache when it has them); return the
    archive with its data source (the raw registry source: the caller puts the chunk cache in front).
    `stale_tag`: when the registry does not answer the tag lookup, open the digest the cache
    remembers for the tag (one warning) instead of failing."""
    ref = Reference.parse(spec)
    meta = MetaStore(cache) if cache is not None else None
    endpoints = Endpoints(ref, options)
    try:
        with trio.fail_after(options.timeout_s * 4):  # the whole open: a few round trips per endpoint
            digest, stale = await _resolve(ref, endpoints, meta, offline, stale_tag and not offline, options.timeout_s)
            cached_only = offline or stale  # a registry that did not answer the tag is not asked again
            manifest = meta.get_blob(digest.hex) if meta is not None else None
            if manifest is None:
                _online(offline, ref, "its manifest", stale)
                manifest = await first_answer(endpoints, lambda c: c.get_manifest(digest))
                if meta is not None:
                    meta.put_blob(digest.hex, manifest)
            (idigest, isize), (ddigest, dsize) = parse_manifest(manifest, str(ref))
            index_digest = Digest.parse(idigest)
            index = meta.get_blob(index_digest.hex, isize) if meta is not None else None
            if index is None:
                _online(offline, ref, "its index blob", stale)
            data_digest = Digest.parse(ddigest)
            flag = f"ranges-ok {ref.registry} {data_digest}"  # probed once per cache
            probe = bool(dsize) and not cached_only and not (meta is not None and meta.has_flag(flag))
            index_fetched = index is None
            index, probe_error = await _index_and_probe(
                endpoints, index_digest, isize, data_digest, dsize, index=index, probe=probe
            )
            log.info("%s: pinned to %s (index %d bytes, data %d bytes)", ref, digest, isize, dsize)
            data: RegistryBlobSource | LocalFileSource = RegistryBlobSource(ref, options, data_digest, dsize)
            if meta is not None and index_fetched:
                meta.put_blob(index_digest.hex, index)
            if meta is not None and probe and probe_error is None:
                meta.set_flag(flag)
            if isinstance(probe_error, RangeNotSupported):
                data = await _whole_blob_fallback(endpoints.origin, data_digest, dsize, cache)
            elif probe_error is not None:
                raise probe_error
    except trio.TooSlowError:
        last = endpoints.last_error()
        why = f" (last: {last})" if last is not None else ""
        raise SourceError(f"{ref}: registry did not answer within {options.timeout_s * 4:.0f} s{why}") from None
    finally:
        with trio.CancelScope(shield=True):
            await endpoints.aclose()
    name = f"{ref.registry}/{ref.repository}@{digest}"
    return RegistryArchive(name, index, data, idigest, created_ns(manifest))


def _online(offline: bool, ref: Reference, what: str, stale: bool = False) -> None:
    if offline:
        raise SourceError(f"{ref}: --offline, and {what} is not in the cache")
    if stale:
        raise SourceError(f"{ref}: the registry does not answer, and {what} is not in the cache")


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


async def _resolve(
    ref: Reference, endpoints: Endpoints, meta: MetaStore | None, offline: bool, stale_ok: bool, timeout_s: float
) -> tuple[Digest, bool]:
    """The manifest digest: the reference's own, else the tag resolved once (and remembered); and
    whether it is the cache's memory of the tag because the registry did not answer (`stale_ok`)."""
    if ref.digest is not None:
        return ref.digest, False
    key = f"{ref.registry}/{ref.repository}:{ref.ref_for_manifest}"
    known = meta.get_tag(key) if meta is not None else None
    if offline:
        if known is None:
            raise SourceError(f"{ref}: --offline, and this tag was never resolved with this cache")
        log.warning(
            "%s: --offline: using the digest this tag had last time, %s (resolved %s)",
            ref,
            known.digest,
            _when(known.resolved_at),
        )
        return Digest.parse(known.digest), False
    try:
        # with a resolution to fall back on, a registry that does not answer costs one --timeout,
        # not the whole open's budget; with one refused (--no-stale-tag), at most three of that
        # budget's four, so the refusal below names the digest it refused instead of the open's
        # timeout cutting the retries short (seen: the retries' backoff outlasted the open)
        limit = math.inf if known is None else timeout_s if stale_ok else 3 * timeout_s
        with trio.fail_after(limit):
            digest = await first_answer(endpoints, lambda c: c.resolve(), resolve=True)
    except (TransientError, trio.TooSlowError) as exc:
        if known is None:
            raise
        why = str(exc) if isinstance(exc, TransientError) else f"no answer within --timeout {timeout_s:g} s"
        if not stale_ok:
            raise TransientError(
                f"{why}; the cache holds {known.digest} for {ref} (resolved {_when(known.resolved_at)}),"
                " not used: --no-stale-tag"
            ) from exc
        log.warning(
            "%s: the registry does not answer (%s); using %s, the digest this tag had when resolved %s"
            " (cached; --no-stale-tag refuses)",
            ref,
            why,
            known.digest,
            _when(known.resolved_at),
        )
        return Digest.parse(known.digest), True
    if meta is not None:
        meta.put_tag(key, str(digest))
    return digest, False


async def _index_and_probe(
    endpoints: Endpoints,
    index_digest: Digest,
    index_size: int,
    data_digest: Digest,
    data_size: int,
    *,
    index: bytes | None,
    probe: bool,
) -> tuple[bytes, BlobmountError | None]:
    """The index blob (unless the cache had it: `index`) and a one-byte range of the data blob
    (when `probe`) at the same time: a round trip less before the mount is ready. The probe's
    error is returned, so the index's error is the one raised when both fail, and no
    ExceptionGroup reaches the CLI's one-line errors."""
    probe_error: list[BlobmountError] = []
    index_error: list[BlobmountError] = []
    if index is not None and not probe:
        return index, None

    async def probe_ranges() -> None:
        try:
            await first_answer(endpoints, lambda c: c.read_range(data_digest, 0, 1, data_size))
        except BlobmountError as exc:
            probe_error.append(exc)

    async with trio.open_nursery() as nursery:
        if probe and data_size:  # an empty data blob is never requested
            nursery.start_soon(probe_ranges)
        if index is None:
            try:
                index = await first_answer(endpoints, lambda c: c.get_blob(index_digest, index_size, MAX_INDEX_BYTES))
            except BlobmountError as exc:
                index_error.append(exc)
                nursery.cancel_scope.cancel()
    if index_error or index is None:
        raise index_error[0]
    return index, probe_error[0] if probe_error else None


async def _whole_blob_fallback(
    client: RegistryClient, digest: Digest, size: int, cache: CacheDir | None
) -> LocalFileSource:
    """The registry ignores ranges: keep the whole blob (digest-verified) in the cache, if it fits."""
    limit = cache.limit_bytes if cache is not None else 0
    if cache is None or size > limit:
        raise LimitExceeded(
            f"{client.ref}: the registry ignores range requests and the {size}-byte data blob does not fit"
            f" the {limit}-byte cache (--cache-size)"
        )
    whole = WholeBlob(cache, digest.hex, size)
    if not whole.present():
        log.warning(
            "%s: the registry ignores range requests; downloading the whole %d-byte data blob into the cache",
            client.ref,
            size,
        )
        try:
            if not await trio.to_thread.run_sync(whole.begin):
                raise LimitExceeded(f"{client.ref}: no room in the cache for the whole {size}-byte data blob")
        except OSError as exc:
            raise SourceError(f"{client.ref}: cannot keep the data blob in the cache: {exc.strerror}") from exc
        done = False
        try:
            async for block in client.stream_blob(digest, size):
                await trio.to_thread.run_sync(whole.write, block)
            await trio.to_thread.run_sync(whole.commit)  # only after stream_blob verified the digest
            done = True
        except OSError as exc:
            raise SourceError(f"{client.ref}: cannot keep the data blob in the cache: {exc.strerror}") from exc
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(whole.abort)
    cache.pin(whole.path)
    return LocalFileSource(whole.path)
