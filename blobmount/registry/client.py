"""The OCI distribution client for one repository: resolving a tag, manifests, blobs (whole or by
range), the redirects to storage and the storage URLs learned from them.

Every request goes one way: :meth:`RegistryClient.request` (auth from tokens.py, one retry per
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
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import trio

from blobmount.errors import (
    AuthError,
    BlobmountError,
    InvalidArchive,
    NotFound,
    SourceError,
    TransientError,
    UsageError,
)
from blobmount.reference import Digest, Reference, host_matches
from blobmount.registry import upload
from blobmount.registry.options import DEFAULT_TIMEOUT_S, Endpoint, RegistryOptions
from blobmount.registry.retry import MAX_ATTEMPTS, Retry
from blobmount.registry.tokens import RegistryAuth
from blobmount.registry.transport import (
    Stats,
    Transport,
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


class RegistryClient:
    """One repository on one registry. Create and use it inside a running trio loop."""

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
        """`endpoint` names a mirror to talk to instead of the reference's registry (same
        repository path); `transport` is the test seam (httpx.MockTransport); None: the network.
        `max_attempts`: mirrors get 1, the next endpoint is the retry."""
        self.ref = ref
        self.options = options or RegistryOptions()
        self.retry = Retry(max_attempts)
        host = endpoint.host if endpoint else ref.api_host
        plain = self._plain_ok(host)
        if endpoint is not None and endpoint.plain_http is not None:
            plain = endpoint.plain_http
        self.base = f"{'http' if plain else 'https'}://{host}"
        self.host = host
        self.scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        self.stats = Stats()
        insecure = any(host_matches(h, host) for h in self.options.insecure) or bool(endpoint and endpoint.insecure)
        ca_file = endpoint.ca_file if endpoint and endpoint.ca_file else self.options.ca_file
        self.transport = Transport(
            self.base, self.options, insecure=insecure, ca_file=ca_file, transport=transport, stats=self.stats
        )
        # a mirror gets only what is stored for the mirror's own host, never the origin's
        # credentials (--username, or the files' entry for the origin)
        self.auth = RegistryAuth(
            host=host,
            base=self.base,
            scope=self.scope,
            options=self.options,
            creds_host=endpoint.host if endpoint else ref.registry,
            credentials=None if endpoint else self.options.credentials,
            send=self.transport.send,
            same_origin=self._same_origin,
            plain_allowed=self._plain_allowed,
        )
        self._storage_urls: dict[str, _StorageUrl] = {}
        self._resolved_body: tuple[Digest, bytes] | None = None

    @property
    def max_attempts(self) -> int:
        return self.retry.attempts

    @property
    def last_error(self) -> BlobmountError | None:
        """What the last retry was for (timeout messages)."""
        return self.retry.last_error

    def _plain_ok(self, host: str) -> bool:
        """Whether plain HTTP is right for `host` (host[:port]): loopback, or named with --plain-http.
        The one rule for the registry's scheme and for where credentials may go in clear."""
        loopback = Reference(host, self.ref.repository, None, None).plain_http_default
        return loopback or any(host_matches(h, host) for h in self.options.plain_http)

    def _plain_allowed(self, url: str) -> bool:
        """Whether credentials may travel to `url`. A challenge can point anywhere; a realm on plain
        HTTP elsewhere would put the password on the wire in clear."""
        parts = urlsplit(url)
        return parts.scheme == "https" or self._plain_ok(parts.netloc)

    def _same_origin(self, url: str) -> bool:
        """Whether `url` is this registry (scheme and host:port): only then our client, its TLS
        settings and our Authorization header are used."""
        parts, base = urlsplit(url), urlsplit(self.base)
        return (parts.scheme, parts.netloc) == (base.scheme, base.netloc)

    async def aclose(self) -> None:
        await self.transport.aclose()

    # -- the request path ------------------------------------------------------------------------

    async def _send(self, method: str, url: str, **kw: Any) -> httpx.Response:
        response = await self.transport.send(method, url, **kw)
        if response.status_code != 429 and response.status_code < 500:
            self.retry.answered()
        return response

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: Any = None,
        kind: str,
        retry: bool = True,
    ) -> httpx.Response:
        """A registry request with auth (one retry per 401) and transient retries, streamed.
        `retry=False`: the caller retries the whole exchange itself (blob reads, whose body can
        fail too); retrying here as well multiplied the attempts (6 x 6 against a 503)."""
        url = path if path.startswith(("http://", "https://")) else self.base + path
        same = self._same_origin(url)
        attempt = 0
        auth_retries = 0
        while True:
            attempt += 1
            try:
                used = await self.auth.header() if same else None
                hdrs = dict(headers or {})
                if used:  # never to another host
                    hdrs["Authorization"] = used
                response = await self._send(method, url, headers=hdrs, content=content, kind=kind, to_registry=same)
                if response.status_code == 401 and auth_retries < 2:
                    await release(response)
                    await self.auth.unauthorized(response, used)  # a failing token endpoint is retried
                    auth_retries += 1  # ... as a transient error, without using up these
                    continue
                if response.status_code == 401:
                    await release(response)
                    raise AuthError(f"{self.host}: {method} {_short(url)}: {self.auth.refusal(response)}")
                if response.status_code == 403:
                    await release(response)
                    raise AuthError(f"{self.host}: {method} {_short(url)}: access denied (403)")
                return response
            except BlobmountError as exc:
                replayable = content is None or isinstance(content, bytes)
                if not retry or not replayable or not self.retry.should_retry(attempt, exc):
                    raise
                await self.retry.pause(attempt, exc)

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

    async def iter_range(self, digest: Digest, start: int, end: int, blob_size: int) -> AsyncGenerator[bytes, None]:
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
                async with raw_blocks(response) as blocks:
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


def _short(url: str) -> str:
    return urlsplit(url).path[:120]
