"""The OCI distribution client for one repository: resolving a tag, manifests, blobs (whole or by
range), the redirects to storage and the storage URLs learned from them.

Every request goes one way: :meth:`Session.request` (session.py: auth from tokens.py, one retry per
401, transient retries by the one policy in retry.py) over transport.py (the one httpx->errors
translation, the metrics, and the fast GET transport). Blob reads: ranges are sent with
``Accept-Encoding: identity`` (a compressing proxy must not shift offsets); a 307/302 to storage is
followed without our Authorization header and the storage URL is reused for later ranges of the
same blob until it fails or ages out; a ``200`` answering a range request is detected and reported
(:class:`RangeNotSupported`), never misread; bodies longer or shorter than asked are errors.
Uploads live in upload.py; the methods here only name them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urljoin

import trio

from blobmount.errors import (
    InvalidArchive,
    NotFound,
    SourceError,
    TransientError,
    UsageError,
)
from blobmount.reference import Digest, Reference
from blobmount.registry import upload
from blobmount.registry.options import DEFAULT_TIMEOUT_S, Endpoint, RegistryOptions
from blobmount.registry.retry import MAX_ATTEMPTS
from blobmount.registry.session import Session
from blobmount.registry.transport import (
    raw_blocks,
    read_exact,
    read_limited,
    release,
    stream_body,
    tls_context,
    translated,
)
from blobmount.registry.upload import BlobReader, bytes_reader

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "BlobReader",
    "Endpoint",
    "RangeNotSupported",
    "RegistryClient",
    "RegistryOptions",
    "bytes_reader",
    "check_content_range",
    "tls_context",
]

log = logging.getLogger(__name__)

MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
STORAGE_URL_TTL_S = 300.0  # presigned storage URLs commonly live 10-20 minutes: re-resolve before
MAX_REDIRECTS = 5
MAX_MANIFEST_BYTES = 4 << 20


class RangeNotSupported(SourceError):
    """The server answered a range request with the whole body (200)."""


@dataclass(slots=True)
class _StorageUrl:
    url: str
    expires_at: float


class RegistryClient(Session):
    """One repository on one registry: manifests and blobs over the session's request path.
    Create and use it inside a running trio loop."""

    def __init__(
        self,
        ref: Reference,
        options: RegistryOptions | None = None,
        *,
        push: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        endpoint: Endpoint | None = None,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        """See :class:`Session`."""
        super().__init__(ref, options, push=push, transport=transport, endpoint=endpoint, max_attempts=max_attempts)
        self._storage_urls: dict[str, _StorageUrl] = {}
        self._resolved_body: tuple[Digest, bytes] | None = None
        self.last_oci_subject: str | None = None  # OCI-Subject of the last manifest PUT (referrers API)

    # -- manifests -------------------------------------------------------------------------------

    async def resolve(self) -> Digest:
        """The manifest digest the reference names: the digest if given, else HEAD (then GET)."""
        if self.ref.digest is not None:
            return self.ref.digest
        tag = self.ref.ref_for_manifest
        path = f"/v2/{self.ref.repository}/manifests/{tag}"
        response = await self.request("HEAD", path, headers={"Accept": MANIFEST_ACCEPT}, kind="manifest-head")
        await release(response)
        if response.status_code == 404:
            raise NotFound(f"{self.ref}: no such tag or repository")
        header = response.headers.get("docker-content-digest")
        if response.status_code == 200 and header:
            with contextlib.suppress(UsageError):  # a header we cannot use: hash the body instead
                return Digest.parse(header)
        # HEAD refused or without a digest: GET and hash the body ourselves, and keep the body so
        # that get_manifest(digest) does not fetch it a second time
        body, _ = await self._get_manifest_body(tag)
        digest = Digest.of(body)
        self._resolved_body = (digest, body)
        return digest

    async def resolve_changed(self, known: Digest) -> Digest | None:
        """The tag's digest if it no longer is `known`, else None (``--follow``): a conditional
        HEAD (If-None-Match), so a registry that honours it answers 304 without a body; one that
        does not (docker-registry) answers 200, and its Docker-Content-Digest is compared."""
        path = f"/v2/{self.ref.repository}/manifests/{self.ref.ref_for_manifest}"
        headers = {"Accept": MANIFEST_ACCEPT, "If-None-Match": f'"{known}"'}
        response = await self.request("HEAD", path, headers=headers, kind="manifest-head")
        await release(response)
        if response.status_code == 304:
            return None
        if response.status_code == 404:
            raise NotFound(f"{self.ref}: no such tag or repository")
        header = response.headers.get("docker-content-digest")
        digest = None
        if response.status_code == 200 and header:
            with contextlib.suppress(UsageError):
                digest = Digest.parse(header)
        if digest is None:  # HEAD refused or without a digest: the body's hash says
            self._resolved_body = None
            digest = await self.resolve()
        return None if digest == known else digest

    async def _get_manifest_body(self, ref: str, limit: int = MAX_MANIFEST_BYTES) -> tuple[bytes, str]:
        path = f"/v2/{self.ref.repository}/manifests/{ref}"
        response = await self.request("GET", path, headers={"Accept": MANIFEST_ACCEPT}, kind="manifest")
        try:
            if response.status_code == 404:
                raise NotFound(f"{self.ref}: manifest {ref} not found")
            if response.status_code != 200:
                raise SourceError(f"{self.ref}: GET manifest answered {response.status_code}")
            body = await read_limited(response, limit, f"{self.ref}: manifest")
            return body, response.headers.get("content-type", "")
        finally:
            await response.aclose()

    async def get_tag_manifest(self, tag: str, limit: int) -> bytes | None:
        """The manifest or index a tag names, None when the tag does not exist (the referrers
        tag schema's `sha256-<hex>` tags, which are absent until a first referrer is pushed)."""
        try:
            body, _ = await self._get_manifest_body(tag, limit)
        except NotFound:
            return None
        return body

    async def get_referrers(self, digest: Digest, limit: int) -> bytes | None:
        """The referrers API's image index for `digest`; None when the registry has no referrers
        API (404, or 400/405 from registries that do not know the path): the caller falls back to
        the tag schema, as the distribution spec asks."""
        path = f"/v2/{self.ref.repository}/referrers/{digest}"
        accept = "application/vnd.oci.image.index.v1+json"
        response = await self.request("GET", path, headers={"Accept": accept}, kind="referrers")
        try:
            if response.status_code in (400, 404, 405):
                return None
            if response.status_code != 200:
                raise SourceError(f"{self.ref}: GET referrers answered {response.status_code}")
            return await read_limited(response, limit, f"{self.ref}: referrers of {digest}")
        finally:
            await response.aclose()

    async def get_manifest(self, digest: Digest) -> bytes:
        """The manifest with this digest, checked: sha256(body) must equal the digest."""
        if self._resolved_body is not None and self._resolved_body[0] == digest:
            return self._resolved_body[1]  # hashed to this digest when resolve() fetched it
        body, _ = await self._get_manifest_body(str(digest))
        actual = Digest.of(body)
        if actual != digest:
            raise InvalidArchive(f"{self.ref}: manifest body hashes to {actual}, not {digest}")
        return body

    # -- blobs -----------------------------------------------------------------------------------

    async def _blob_response(
        self, digest: Digest, headers: dict[str, str], kind: str, *, retry: bool = True
    ) -> httpx.Response:
        """GET a blob, following redirects to storage (without our Authorization header) and
        reusing a known storage URL. `retry=False` when the caller retries the whole read."""
        key = str(digest)
        cached = self._storage_urls.get(key)
        if cached is not None and trio.current_time() < cached.expires_at:
            try:
                response = await self._send("GET", cached.url, headers=headers, kind=kind, to_registry=False)
                if response.status_code in (200, 206, 416):
                    return response
                await release(response)
                log.debug("%s: storage URL answered %d; re-resolving", self.host, response.status_code)
            except TransientError:
                log.debug("%s: storage URL failed; re-resolving", self.host)
            self._storage_urls.pop(key, None)
        path = f"/v2/{self.ref.repository}/blobs/{digest}"
        response = await self.request("GET", path, headers=headers, kind=kind, retry=retry)
        url = self.base + path
        for _ in range(MAX_REDIRECTS):
            if response.status_code not in (301, 302, 303, 307, 308):
                return response
            location = response.headers.get("location")
            await release(response)
            if not location:
                raise SourceError(f"{self.host}: redirect without a Location")
            url = urljoin(url, location)
            if self._same_origin(url):
                response = await self.request("GET", url, headers=headers, kind=kind, retry=retry)
            else:
                response = await self._send("GET", url, headers=headers, kind=kind, to_registry=False)
                if response.status_code in (200, 206):
                    self._storage_urls[key] = _StorageUrl(url, trio.current_time() + STORAGE_URL_TTL_S)
        await release(response)
        raise SourceError(f"{self.host}: more than {MAX_REDIRECTS} redirects for blob {digest}")

    async def read_range(self, digest: Digest, start: int, end: int, blob_size: int) -> bytes:
        """Bytes [start, end) of a blob via one range request (retried when transient)."""
        if start >= end:
            return b""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with contextlib.aclosing(self.iter_range(digest, start, end, blob_size)) as blocks:
                    return b"".join([block async for block in blocks])
            except TransientError as exc:
                if not self.retry.should_retry(attempt, exc):
                    raise
                await self.retry.pause(attempt, exc)

    async def iter_range(
        self, digest: Digest, start: int, end: int, blob_size: int, block_bytes: int = 1 << 20
    ) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) of a blob from one range request (one attempt), yielded as they arrive.

        Nothing is retried here: the caller retries the whole read (read_range, or the fetcher,
        which resumes from the bytes it got), so there is one retry loop, never loops within
        loops. A body that breaks, runs longer or ends shorter than asked raises TransientError
        after the blocks already yielded."""
        if start >= end:
            return
        want = end - start
        what = f"{self.host}: blob {digest} range {start}-{end}"
        response = await self._open_range(digest, start, end, blob_size)
        got = 0
        try:
            with translated(self.host, f"{what}: body broke off: "):
                async with raw_blocks(response, block_bytes) as blocks:
                    async for block in blocks:
                        got += len(block)
                        if got > want:
                            raise TransientError(f"{what}: body longer than the {want} bytes asked for")
                        self.stats.bytes_fetched += len(block)
                        yield block
        finally:
            await response.aclose()
        if got != want:
            raise TransientError(f"{what}: body of {got} bytes, expected {want}")

    async def _open_range(self, digest: Digest, start: int, end: int, blob_size: int) -> httpx.Response:
        """A 206 (or a 200 for the whole blob) whose headers promise exactly [start, end)."""
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        response = await self._blob_response(digest, headers, "range", retry=False)
        status = response.status_code
        try:
            encoding = response.headers.get("content-encoding", "identity").lower()
            if status in (200, 206) and encoding not in ("", "identity"):
                raise SourceError(f"{self.host}: a range answered with Content-Encoding; offsets would shift")
            if status == 206:
                check_content_range(response.headers.get("content-range", ""), start, end, blob_size)
                length = response.headers.get("content-length")
                if length is not None and length != str(end - start):  # refused before a byte is read
                    raise TransientError(
                        f"{self.host}: a range of {end - start} bytes answered with Content-Length {length[:20]}"
                    )
                return response
            if status == 200:
                if start == 0 and end == blob_size:
                    return response
                raise RangeNotSupported(f"{self.host}: answered a range request with the whole blob (200)")
            if status == 404:
                raise SourceError(f"{self.host}: blob {digest} not found")
            if status == 416:
                raise SourceError(f"{self.host}: range {start}-{end} outside blob {digest}")
            raise SourceError(f"{self.host}: range GET answered {status}")
        except BaseException:
            await response.aclose()  # unread: a whole blob answering a range is never downloaded
            raise

    async def get_blob(self, digest: Digest, size: int, limit: int) -> bytes:
        """A whole small blob (the index), verified against its digest and size."""
        if size > limit:
            raise InvalidArchive(f"{self.ref}: blob {digest} of {size} bytes exceeds the {limit}-byte limit")
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._blob_response(digest, {"Accept-Encoding": "identity"}, "blob", retry=False)
                try:
                    if response.status_code == 404:
                        raise SourceError(f"{self.ref}: blob {digest} not found")
                    if response.status_code != 200:
                        raise SourceError(f"{self.ref}: GET blob {digest} answered {response.status_code}")
                    announced = response.headers.get("content-length")
                    if announced is not None and announced.isdigit() and int(announced) != size:
                        # not a broken transfer (retrying cannot help): the descriptor is wrong
                        raise InvalidArchive(
                            f"{self.ref}: blob {digest} is {announced} bytes, the manifest says {size}"
                        )
                    body = await read_exact(response, size, f"{self.ref}: blob {digest}")
                finally:
                    await release(response)
                break
            except TransientError as exc:
                if not self.retry.should_retry(attempt, exc):
                    raise
                await self.retry.pause(attempt, exc)
        self.stats.bytes_fetched += len(body)
        if Digest.of(body) != digest:
            raise InvalidArchive(f"{self.ref}: blob body hashes to {Digest.of(body)}, not {digest}")
        return body

    async def stream_blob(self, digest: Digest, size: int) -> AsyncIterator[bytes]:
        """The whole blob, streamed, sha256-checked at the end (raises after the last block)."""
        response = await self._blob_response(digest, {"Accept-Encoding": "identity"}, "blob")
        hasher = hashlib.sha256()
        total = 0
        try:
            if response.status_code != 200:
                raise SourceError(f"{self.ref}: GET blob {digest} answered {response.status_code}")
            async for block in stream_body(response, f"{self.host}: blob {digest}", 1 << 20):
                total += len(block)
                if total > size:
                    raise InvalidArchive(f"{self.ref}: blob {digest} is longer than its {size} bytes")
                hasher.update(block)
                yield block
        finally:
            await response.aclose()
        self.stats.bytes_fetched += total
        if total != size or hasher.hexdigest() != digest.hex:
            raise InvalidArchive(f"{self.ref}: blob {digest} did not verify ({total} bytes)")

    # -- push (upload.py) ------------------------------------------------------------------------

    async def blob_exists(self, digest: Digest) -> bool:
        return await upload.blob_exists(self, digest)

    async def upload_blob(
        self, digest: Digest, size: int, read_at: BlobReader, *, chunk_bytes: int | None = None
    ) -> None:
        await upload.upload_blob(self, digest, size, read_at, chunk_bytes=chunk_bytes)

    async def put_manifest(self, tag: str, body: bytes, media_type: str) -> Digest:
        return await upload.put_manifest(self, tag, body, media_type)


def check_content_range(value: str, start: int, end: int, blob_size: int) -> None:
    """A 206's ``Content-Range`` must name exactly the bytes asked for (``bytes a-b/total``)."""
    unit, _, spec = value.strip().partition(" ")
    rng, _, total = spec.partition("/")
    first, _, last = rng.partition("-")
    try:
        a, b = int(first), int(last)
        t = None if total == "*" else int(total)
    except ValueError:
        raise SourceError(f"malformed Content-Range {value[:80]!r}") from None
    if t is not None and t != blob_size and unit.lower() == "bytes":
        # the blob itself differs from its descriptor: permanent, so not worth a retry
        raise SourceError(f"the registry's blob has {t} bytes, its descriptor says {blob_size}")
    if unit.lower() != "bytes" or a != start or b != end - 1:
        raise TransientError(f"Content-Range {value[:80]!r} does not match the requested bytes {start}-{end - 1}")
