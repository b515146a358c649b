"""The OCI distribution client: the only module that speaks HTTP (and imports httpx).

Every httpx exception is translated here, in :meth:`RegistryClient._send`, into the errors.py tree
with its cause chained; :func:`is_transient` is the one predicate that drives retries (exponential
backoff with jitter, ``Retry-After`` honoured, all inside the caller's total ``timeout_s``).

Auth: anonymous first; a 401 with a ``Bearer`` challenge fetches a token from the realm (with basic
credentials when we have them) and retries; a ``Basic`` challenge sends the credentials. Tokens are
refreshed when they expire or when a request answers 401, under one lock, so concurrent reads in
flight wait for the same refresh instead of failing. The Authorization header goes only to the
registry host: a redirect to storage elsewhere is followed without it.

Blob reads: ranges are sent with ``Accept-Encoding: identity`` (a compressing proxy must not shift
offsets); a 307/302 to storage is followed and the storage URL is reused for later ranges of the same
blob until it fails or ages out; a ``200`` answering a range request is detected and reported
(:class:`RangeNotSupported`), never misread; bodies longer or shorter than asked are errors.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import ssl
import time
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlencode, urljoin, urlsplit

import httpcore  # noqa: F401  httpx loads it with the first client; here it is loaded before a mount's first request
import httpx
import trio

from blobmount import __version__, logs, metrics
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
from blobmount.registry.auth import Challenge, Credentials, find_credentials, parse_www_authenticate
from blobmount.registry.options import DEFAULT_TIMEOUT_S, Endpoint, RegistryOptions
from blobmount.registry.wire import WirePool, WireResponse

__all__ = ["DEFAULT_TIMEOUT_S", "Endpoint", "RangeNotSupported", "RegistryClient", "RegistryOptions"]

log = logging.getLogger(__name__)
retry_log = logging.getLogger(logs.RETRY_LOGGER)  # a child of `log`; one-shot commands quiet it (logs.py)

MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
CONNECT_TIMEOUT_S = 10.0
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
MAX_ATTEMPTS = 6  # with backoff capped at 5 s this stays inside a 30 s budget
STORAGE_URL_TTL_S = 300.0  # presigned storage URLs commonly live 10-20 minutes: re-resolve before
TOKEN_MARGIN_S = 10.0  # refresh a bearer token this long before it expires (a request takes time) ...
TOKEN_MARGIN_FRACTION = 0.25  # ... but at most this part of its life: a 4 s token is still used for 3 s
DEFAULT_TOKEN_LIFETIME_S = 60.0  # the token spec's default when expires_in is absent
TOKEN_CLIENT_ID = "blobmount"  # the OAuth2 client_id the token spec asks refresh-token requests to name
MAX_TOKEN_ANSWER_BYTES = 1 << 20  # a token answer is a few KiB; a hostile realm must not fill memory
MAX_REDIRECTS = 5
MAX_DRAIN_BYTES = 64 << 10  # an unneeded body up to this size is read so its connection is reused
UPLOAD_ATTEMPTS = 3  # whole-upload restarts (each request inside is retried on its own as well)
UPLOAD_BLOCK_BYTES = 1 << 20  # a monolithic upload streams the body in blocks of this size
USER_AGENT = f"blobmount/{__version__}"


class RangeNotSupported(SourceError):
    """The server answered a range request with the whole body (200)."""


BlobReader = Callable[[int, int], Awaitable[bytes]]  # (offset, length) -> those bytes of the blob


def bytes_reader(data: bytes) -> BlobReader:
    async def read_at(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return read_at


async def _stream(read_at: BlobReader, size: int, block: int) -> AsyncGenerator[bytes, None]:
    offset = 0
    while offset < size:
        data = await read_at(offset, min(block, size - offset))
        if not data:
            raise SourceError(f"blob source ended at {offset} of {size} bytes")
        offset += len(data)
        yield data


@functools.cache
def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """One verifying TLS context per process and CA file. Building one costs 15-90 ms (loading the
    CA store); httpx would build a fresh one for every client, twice per RegistryClient. Built in
    the mount's parent, it is inherited across the fork, so the first read pays nothing."""
    import certifi  # httpx's own CA bundle: present wherever httpx is, system store or not

    context = ssl.create_default_context(cafile=certifi.where())
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


@functools.cache
def _unverified_context() -> ssl.SSLContext:
    """For hosts named by --insecure only."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _plain_verify() -> ssl.SSLContext | bool:
    """TLS settings of a client that speaks plain HTTP: none, unless an HTTPS proxy from the
    environment is in the way (its certificate is verified like any other)."""
    names = ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(name, "").lower().startswith("https:") for name in names):
        return tls_context(None)
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether retrying `exc` may succeed (the one predicate the retry loops use)."""
    return isinstance(exc, TransientError)


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), BACKOFF_MAX_S * 4))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class _UploadLost(TransientError):
    """The registry no longer accepts this upload session: start the upload over."""


class _RetryLater(TransientError):
    def __init__(self, message: str, retry_after_s: float | None, status: int = 0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status


@dataclass(slots=True)
class _Token:
    header: str
    refresh_at: float  # trio.current_time() clock: from then on a new token is fetched before sending


@dataclass(slots=True)
class _StorageUrl:
    url: str
    expires_at: float


@dataclass(slots=True)
class Stats:
    requests: int = 0
    bytes_fetched: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.requests += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


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
        repository path); `transport` is the test seam (httpx.MockTransport); None: the network."""
        self.ref = ref
        self.options = options or RegistryOptions()
        self.max_attempts = max_attempts  # mirrors get 1: the next endpoint is the retry
        host = endpoint.host if endpoint else ref.api_host
        plain = self._plain_ok(host)
        if endpoint is not None and endpoint.plain_http is not None:
            plain = endpoint.plain_http
        self.base = f"{'http' if plain else 'https'}://{host}"
        self.host = host
        self.scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        self.stats = Stats()
        self._transport = transport
        self._ca_file = endpoint.ca_file if endpoint and endpoint.ca_file else self.options.ca_file
        self._insecure = any(host_matches(h, host) for h in self.options.insecure) or bool(
            endpoint and endpoint.insecure
        )
        self._http_client: httpx.AsyncClient | None = None
        self._storage_client: httpx.AsyncClient | None = None
        self._plain_client: httpx.AsyncClient | None = None
        # a mirror gets only what is stored for the mirror's own host, never the origin's
        # credentials (--username, or the files' entry for the origin)
        self._creds_host = endpoint.host if endpoint else ref.registry
        self._creds = None if endpoint else self.options.credentials
        self._creds_loaded = self._creds is not None
        self._token: _Token | None = None
        self._challenge: Challenge | None = None
        self._basic = False
        self._auth_lock = trio.Lock()
        self._shared_loaded = False
        self._storage_urls: dict[str, _StorageUrl] = {}
        self._resolved_body: tuple[Digest, bytes] | None = None
        self._wire: dict[str, WirePool] = {}
        self._retry_streak = 0  # retries since the last good answer: log levels escalate on it
        self.last_error: BlobmountError | None = None  # what the last retry was for (timeout messages)
        self.last_oci_subject: str | None = None  # OCI-Subject of the last manifest PUT (referrers API)

    @property
    def _http(self) -> httpx.AsyncClient:
        """The client for this registry, made on first use. A plain-HTTP registry gets no TLS
        context at all (loading the CA store costs 15-90 ms of a mount's start)."""
        if self._http_client is None:
            verify = _plain_verify()
            if self.base.startswith("https:") and not self._insecure:
                verify = tls_context(str(self._ca_file) if self._ca_file else None)
            self._http_client = self._new_client(verify)
        return self._http_client

    def _elsewhere(self, url: str) -> httpx.AsyncClient:
        """The client for other hosts (storage, token realms), made on first use: TLS always
        verified, never with this registry's --insecure (--ca-file only adds trust, so it applies);
        plain-HTTP URLs get a client without a TLS context."""
        if url.startswith("http:"):
            if self._plain_client is None:
                self._plain_client = self._new_client(_plain_verify())
            return self._plain_client
        if self._storage_client is None:
            self._storage_client = self._new_client(
                tls_context(str(self.options.ca_file) if self.options.ca_file else None)
            )
        return self._storage_client

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

    def _new_client(self, verify: ssl.SSLContext | bool) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(self.options.timeout_s, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=self.options.max_connections),
            follow_redirects=False,
            trust_env=True,  # HTTP(S)_PROXY / NO_PROXY
            headers={"User-Agent": USER_AGENT},
            transport=self._transport,
        )

    def _registry_tls(self) -> ssl.SSLContext:
        """The fast path's TLS settings for this registry: the same trust as its httpx client."""
        if self._insecure:
            return _unverified_context()
        return tls_context(str(self._ca_file) if self._ca_file else None)

    async def aclose(self) -> None:
        for pool in self._wire.values():
            await pool.aclose()
        for client in (self._http_client, self._storage_client, self._plain_client):
            if client is not None:
                await client.aclose()
        self._http_client = self._storage_client = self._plain_client = None

    # -- auth ----------------------------------------------------------------------------------

    def _credentials(self) -> Credentials | None:
        if not self._creds_loaded:
            self._creds = find_credentials(self._creds_host)
            self._creds_loaded = True
        return self._creds

    def _load_shared(self) -> None:
        """Start from what another client of the same options learned (the mount's parent, for
        the daemon): the challenge, a token still valid, or that basic auth is wanted."""
        self._shared_loaded = True
        shared = self.options.auth_cache.get(self.base, self.scope)
        if shared is None:
            return
        self._challenge, self._basic = shared.challenge, shared.basic
        remaining = shared.refresh_at - time.monotonic()
        if shared.header is not None and remaining > 0:
            self._token = _Token(shared.header, trio.current_time() + remaining)

    def _auth_header(self) -> str | None:
        if self._token is not None:
            if trio.current_time() < self._token.refresh_at:
                return self._token.header
            return None
        if self._basic:
            creds = self._credentials()
            return creds.basic_header() if creds else None
        return None

    async def _authenticate(self, response: httpx.Response, used: str | None) -> None:
        """React to a 401: fetch or refresh a token, or switch to basic auth. Single-flight."""
        async with self._auth_lock:
            if self._auth_header() != used and self._auth_header() is not None:
                return  # another task refreshed while we waited
            challenges = parse_www_authenticate(response.headers.get("www-authenticate", ""))
            bearer = next((c for c in challenges if c.scheme == "bearer"), None)
            if bearer is not None:
                await self._fetch_token(bearer)
                return
            if any(c.scheme == "basic" for c in challenges):
                if self._credentials() is None:
                    raise AuthError(f"{self.host}: authentication required and no credentials found")
                if self._basic:
                    raise AuthError(f"{self.host}: credentials refused (basic auth)")
                self._basic = True
                self.options.auth_cache.put_basic(self.base, self.scope)
                return
            raise AuthError(f"{self.host}: 401 without a usable WWW-Authenticate challenge")

    async def _fetch_token(self, challenge: Challenge) -> None:
        """A bearer token from the challenge's realm (the distribution token spec): an OAuth2 POST
        when we hold an identity (refresh) token, else a GET, with basic credentials when we have
        them (anonymous otherwise: public repositories hand out pull tokens)."""
        realm = challenge.params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise AuthError(f"{self.host}: bearer challenge without a usable realm")
        where = f"{self.host}: token endpoint {urlsplit(realm).netloc}"
        form = {"scope": self.scope}
        if challenge.params.get("service"):
            form["service"] = challenge.params["service"]
        creds = self._credentials()
        if creds is not None and not self._plain_allowed(realm):
            netloc = urlsplit(realm).netloc
            raise AuthError(
                f"{where} is plain http://: refusing to send credentials over it"
                f" (--plain-http {netloc} if that is intended)"
            )
        headers = {"Accept": "application/json"}
        if creds is not None and creds.identity_token:
            method, url = "POST", realm
            form.update(grant_type="refresh_token", refresh_token=creds.identity_token, client_id=TOKEN_CLIENT_ID)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            content: bytes | None = urlencode(form).encode()
        else:
            method, url, content = "GET", realm + ("&" if "?" in realm else "?") + urlencode(form), None
            if creds is not None and creds.username and creds.password:
                headers["Authorization"] = creds.basic_header()
        # the realm on the registry's own host shares its connections and TLS settings
        same_host = self._same_origin(realm)
        try:
            response = await self._send(
                method, url, headers=headers, content=content, kind="token", to_registry=same_host
            )
        except _RetryLater as exc:
            raise _RetryLater(f"{where} answered {exc.status}", exc.retry_after_s) from exc
        except TransientError as exc:
            raise TransientError(f"{where} unreachable ({exc})") from exc
        try:
            if response.status_code in (401, 403):
                refused = "refused the credentials" if creds is not None else "refused an anonymous token"
                raise AuthError(f"{where} {refused} ({response.status_code})")
            if response.status_code != 200:
                raise AuthError(f"{where} answered {response.status_code}")
            body = await _read_limited(response, MAX_TOKEN_ANSWER_BYTES, where)
        finally:
            await response.aclose()
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise AuthError(f"{where} answered something that is not JSON") from exc
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{where} answered no token")
        lifetime = doc.get("expires_in")
        seconds = float(lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else DEFAULT_TOKEN_LIFETIME_S
        margin = min(TOKEN_MARGIN_S, seconds * TOKEN_MARGIN_FRACTION)
        self._token = _Token(f"Bearer {token}", trio.current_time() + seconds - margin)
        self._challenge = challenge
        self.options.auth_cache.put_token(self.base, self.scope, challenge, self._token.header, seconds - margin)
        log.debug("%s: bearer token for %s, valid %.0f s", self.host, self.scope, seconds)

    # -- requests ------------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: Any = None,
        kind: str,
        to_registry: bool = True,
    ) -> httpx.Response:
        """One HTTP exchange with the body streamed; errors translated, nothing retried here."""
        client = self._http if to_registry else self._elsewhere(url)
        request = client.build_request(method, url, headers=dict(headers or {}), content=content)
        self.stats.count(kind)
        try:
            response = await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            metrics.HTTP_REQUESTS.labels(kind=kind, code="error").inc()
            host = urlsplit(url).netloc
            problem = _tls_problem(exc)
            if problem is not None:  # retrying cannot fix a certificate: say so, and how to proceed
                raise SourceError(f"{host}: {problem}") from exc
            raise TransientError(f"{host}: {type(exc).__name__}: {exc}") from exc
        except httpx.TimeoutException as exc:
            metrics.HTTP_REQUESTS.labels(kind=kind, code="error").inc()
            raise TransientError(f"{urlsplit(url).netloc}: timed out ({type(exc).__name__})") from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
            metrics.HTTP_REQUESTS.labels(kind=kind, code="error").inc()
            raise TransientError(f"{urlsplit(url).netloc}: {type(exc).__name__}: {exc}") from exc
        except httpx.HTTPError as exc:
            metrics.HTTP_REQUESTS.labels(kind=kind, code="error").inc()
            raise SourceError(f"{urlsplit(url).netloc}: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        metrics.HTTP_REQUESTS.labels(kind=kind, code=str(status)).inc()
        if status != 429 and status < 500:
            self._retry_streak = 0
        if response.is_closed:  # read eagerly (in-memory transports): nothing left in flight
            metrics.HTTP_BYTES.labels(kind=kind).inc(len(response.content))
        elif isinstance(response.stream, httpx.AsyncByteStream):
            response.stream = _CountedStream(response.stream, kind)
        if status == 429 or status in (500, 502, 503, 504):
            await _release(response)
            raise _RetryLater(f"{urlsplit(url).netloc}: {method} answered {status}", _retry_after_s(response), status)
        return response

    async def _request(
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
        attempt = 0
        auth_retries = 0
        if not self._shared_loaded:
            self._load_shared()
        while True:
            attempt += 1
            used = self._auth_header()
            if used is None and (self._token is not None or self._basic or self._challenge is not None):
                used = await self._refresh_expired()
            hdrs = dict(headers or {})
            if used and self._same_origin(url):  # never to another host
                hdrs["Authorization"] = used
            try:
                response = await self._send(
                    method, url, headers=hdrs, content=content, kind=kind, to_registry=self._same_origin(url)
                )
                if response.status_code == 401 and auth_retries < 2:
                    await _release(response)
                    await self._authenticate(response, used)  # a failing token endpoint is retried
                    auth_retries += 1  # ... as a transient error, without using up these
                    continue
                if response.status_code == 401:
                    await _release(response)
                    raise AuthError(f"{self.host}: {method} {_short(url)}: {self._refusal(response)}")
                if response.status_code == 403:
                    await _release(response)
                    raise AuthError(f"{self.host}: {method} {_short(url)}: access denied (403)")
                return response
            except BlobmountError as exc:
                replayable = content is None or isinstance(content, bytes)
                if not retry or not is_transient(exc) or attempt >= self.max_attempts or not replayable:
                    raise
                await self._backoff(attempt, exc)

    def _refusal(self, response: httpx.Response) -> str:
        """Why a request stayed unauthorized after fresh credentials: the one line the user sees."""
        challenges = parse_www_authenticate(response.headers.get("www-authenticate", ""))
        errors = {c.params.get("error") for c in challenges}
        if self._credentials() is None:
            return f"authentication required and no credentials found for {self._creds_host} (401)"
        if "insufficient_scope" in errors:
            return f"access denied: the credentials do not grant {self.scope} (401 insufficient_scope)"
        return "credentials refused (401)"

    async def _refresh_expired(self) -> str | None:
        """The token aged out: fetch a new one with the last challenge before sending, so reads in
        flight wait for one refresh instead of each collecting a 401."""
        async with self._auth_lock:
            header = self._auth_header()
            if header is None and self._challenge is not None:
                await self._fetch_token(self._challenge)
                header = self._auth_header()
            return header

    async def _backoff(self, attempt: int, exc: BlobmountError) -> None:
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * (2 ** (attempt - 1)))
        delay *= 0.5 + random.random()  # jitter: a fleet must not retry in lockstep
        if isinstance(exc, _RetryLater) and exc.retry_after_s is not None:
            delay = max(delay, exc.retry_after_s)
        # A retry is news once it repeats: by this loop's count, or by the streak of failures with
        # no good answer between them (nested retry loops restart `attempt`, not the streak).
        self._retry_streak += 1
        self.last_error = exc
        level = logging.DEBUG if attempt < 3 and self._retry_streak < 3 else logging.WARNING
        metrics.HTTP_RETRIES.inc()
        retry_log.log(level, "%s; retry %d in %.2f s", exc, attempt, delay)
        await trio.sleep(delay)

    # -- manifests -----------------------------------------------------------------------------

    async def resolve(self) -> Digest:
        """The manifest digest the reference names: the digest if given, else HEAD (then GET)."""
        if self.ref.digest is not None:
            return self.ref.digest
        tag = self.ref.ref_for_manifest
        path = f"/v2/{self.ref.repository}/manifests/{tag}"
        response = await self._request("HEAD", path, headers={"Accept": MANIFEST_ACCEPT}, kind="manifest-head")
        await _release(response)
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

    async def _get_manifest_body(self, ref: str, limit: int = 4 << 20) -> tuple[bytes, str]:
        path = f"/v2/{self.ref.repository}/manifests/{ref}"
        response = await self._request("GET", path, headers={"Accept": MANIFEST_ACCEPT}, kind="manifest")
        try:
            if response.status_code == 404:
                raise NotFound(f"{self.ref}: manifest {ref} not found")
            if response.status_code != 200:
                raise SourceError(f"{self.ref}: GET manifest answered {response.status_code}")
            body = await _read_limited(response, limit, f"{self.ref}: manifest")
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
        response = await self._request("GET", path, headers={"Accept": accept}, kind="referrers")
        try:
            if response.status_code in (400, 404, 405):
                return None
            if response.status_code != 200:
                raise SourceError(f"{self.ref}: GET referrers answered {response.status_code}")
            return await _read_limited(response, limit, f"{self.ref}: referrers of {digest}")
        finally:
            await response.aclose()

    # -- blobs ---------------------------------------------------------------------------------

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
                await _release(response)
                log.debug("%s: storage URL answered %d; re-resolving", self.host, response.status_code)
            except TransientError:
                log.debug("%s: storage URL failed; re-resolving", self.host)
            self._storage_urls.pop(key, None)
        path = f"/v2/{self.ref.repository}/blobs/{digest}"
        response = await self._request("GET", path, headers=headers, kind=kind, retry=retry)
        url = self.base + path
        for _ in range(MAX_REDIRECTS):
            if response.status_code not in (301, 302, 303, 307, 308):
                return response
            location = response.headers.get("location")
            await _release(response)
            if not location:
                raise SourceError(f"{self.host}: redirect without a Location")
            url = urljoin(url, location)
            if self._same_origin(url):
                response = await self._request("GET", url, headers=headers, kind=kind, retry=retry)
            else:
                response = await self._send("GET", url, headers=headers, kind=kind, to_registry=False)
                if response.status_code in (200, 206):
                    self._storage_urls[key] = _StorageUrl(url, trio.current_time() + STORAGE_URL_TTL_S)
        await _release(response)
        raise SourceError(f"{self.host}: more than {MAX_REDIRECTS} redirects for blob {digest}")

    async def read_range(self, digest: Digest, start: int, end: int, blob_size: int) -> bytes:
        """Bytes [start, end) of a blob via one range request (retried when transient)."""
        if start >= end:
            return b""
        for attempt in range(1, self.max_attempts + 1):
            try:
                blocks = self.iter_range(digest, start, end, blob_size, retry=False)
                async with contextlib.aclosing(blocks):
                    return b"".join([block async for block in blocks])
            except TransientError as exc:
                if attempt >= self.max_attempts:
                    raise
                await self._backoff(attempt, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    async def iter_range(
        self,
        digest: Digest,
        start: int,
        end: int,
        blob_size: int,
        block_bytes: int = 1 << 20,
        *,
        retry: bool = True,
    ) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) of a blob from one range request, yielded as they arrive.

        Opening the response is retried (429/5xx/resets, storage redirects) unless `retry` is
        False (the caller retries the whole read: one retry loop, never loops within loops); the
        body is not: a body that breaks, runs longer or ends shorter than asked raises
        TransientError after the blocks already yielded, so the caller can resume from what it
        got. The common case goes over the fast path (wire.py); everything else over httpx."""
        if start >= end:
            return
        want = end - start
        what = f"{self.host}: blob {digest} range {start}-{end}"
        fast = await self._open_range_wire(digest, start, end, blob_size)
        if fast is not None:
            got = 0
            counted = metrics.HTTP_BYTES.labels(kind="range")
            metrics.HTTP_IN_FLIGHT.inc()
            try:
                async for block in fast.iter_body(block_bytes):
                    got += len(block)
                    self.stats.bytes_fetched += len(block)
                    counted.inc(len(block))
                    yield block
            finally:
                metrics.HTTP_IN_FLIGHT.dec()
                await fast.aclose()
            if got != want:
                raise TransientError(f"{what}: body of {got} bytes, expected {want}")
            return
        response = await self._open_range(digest, start, end, blob_size, retry=retry)
        got = 0
        try:
            async with _body(response, block_bytes) as blocks:
                async for block in blocks:
                    got += len(block)
                    if got > want:
                        raise TransientError(f"{what}: body longer than the {want} bytes asked for")
                    self.stats.bytes_fetched += len(block)
                    yield block
        except httpx.HTTPError as exc:
            raise TransientError(f"{what}: body broke off after {got} bytes ({type(exc).__name__})") from exc
        finally:
            await response.aclose()
        if got != want:
            raise TransientError(f"{what}: body of {got} bytes, expected {want}")

    def _wire_pool(self, url: str) -> WirePool | None:
        """The fast path's connections for `url`'s origin; None where httpx must go (an injected
        transport in tests, or a proxy that applies to this host)."""
        if self._transport is not None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        key = f"{parts.scheme}://{parts.netloc}"
        pool = self._wire.get(key)
        if pool is None:
            proxies = urllib.request.getproxies_environment()
            if parts.scheme in proxies and not urllib.request.proxy_bypass(parts.netloc):
                return None
            context: ssl.SSLContext | None = None
            if parts.scheme == "https":
                context = self._registry_tls() if key == self.base else tls_context(None)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            pool = WirePool(
                parts.scheme, parts.hostname, port, context, USER_AGENT, max_idle=self.options.max_connections
            )
            self._wire[key] = pool
        return pool

    async def _open_range_wire(self, digest: Digest, start: int, end: int, blob_size: int) -> WireResponse | None:
        """The common case on the fast path (wire.py): a 206 (or a 200 for the whole blob) from the
        registry with the current credentials, or from a storage URL learned earlier. None sends
        the request through httpx instead: first contact, 401, redirects, 429/5xx, anything odd."""
        cached = self._storage_urls.get(str(digest))
        auth: str | None = None
        if cached is not None and trio.current_time() < cached.expires_at:
            url = cached.url
        else:
            url = f"{self.base}/v2/{self.ref.repository}/blobs/{digest}"
            if not self._shared_loaded:
                self._load_shared()  # the token the mount fetched before the fork
            auth = self._auth_header()
            if auth is None and (self._token is not None or self._basic or self._challenge is not None):
                return None  # a token to refresh: httpx's path does it under the lock
        pool = self._wire_pool(url)
        if pool is None:
            return None
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        if auth:
            headers["Authorization"] = auth
        target = urlsplit(url)._replace(scheme="", netloc="").geturl()
        self.stats.count("range")
        try:
            response = await pool.get(target, headers)
        except TransientError:
            metrics.HTTP_REQUESTS.labels(kind="range", code="error").inc()
            raise
        metrics.HTTP_REQUESTS.labels(kind="range", code=str(response.status)).inc()
        if response.status == 401 and auth is not None and self._token is not None and auth == self._token.header:
            self._token.refresh_at = 0.0  # refused before its time: the httpx path fetches a new one
        whole = start == 0 and end == blob_size
        if response.status == 200 and not whole:  # a range answered with the whole blob: known now
            await response.aclose()  # dropped unread; asking httpx the same would fetch it again
            raise RangeNotSupported(f"{self.host}: answered a range request with the whole blob (200)")
        ok = response.status == 206 or (response.status == 200 and whole)
        encoding = response.headers.get("content-encoding", "identity").lower()
        if not ok or encoding not in ("", "identity") or response.remaining != end - start:
            await response.aclose()
            return None
        if response.status == 206:
            try:
                check_content_range(response.headers.get("content-range", ""), start, end, blob_size)
            except BaseException:
                await response.aclose()
                raise
        return response

    async def _open_range(
        self, digest: Digest, start: int, end: int, blob_size: int, *, retry: bool = True
    ) -> httpx.Response:
        """A 206 (or a 200 for the whole blob) whose headers promise exactly [start, end). This is
        the one retry loop of opening a range (`retry=False`: one attempt, the caller loops)."""
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        attempts = self.max_attempts if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                response = await self._blob_response(digest, headers, "range", retry=False)
            except TransientError as exc:  # 429/5xx/resets before any answer
                if attempt >= attempts:
                    raise
                await self._backoff(attempt, exc)
                continue
            status = response.status_code
            try:
                if status == 206:
                    check_content_range(response.headers.get("content-range", ""), start, end, blob_size)
                    if response.headers.get("content-encoding", "identity").lower() not in ("", "identity"):
                        raise SourceError(f"{self.host}: a range answered with Content-Encoding; offsets would shift")
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
            except TransientError as exc:
                await response.aclose()
                if attempt >= attempts:
                    raise
                await self._backoff(attempt, exc)
            except BaseException:
                await response.aclose()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def get_blob(self, digest: Digest, size: int, limit: int) -> bytes:
        """A whole small blob (the index), verified against its digest and size."""
        if size > limit:
            raise InvalidArchive(f"{self.ref}: blob {digest} of {size} bytes exceeds the {limit}-byte limit")
        for attempt in range(1, self.max_attempts + 1):
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
                    body = await _read_exact(response, size, f"{self.ref}: blob {digest}")
                finally:
                    await _release(response)
                break
            except TransientError as exc:
                if attempt >= self.max_attempts:
                    raise
                await self._backoff(attempt, exc)
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
            async with _body(response, 1 << 20) as blocks:
                async for block in blocks:
                    total += len(block)
                    if total > size:
                        raise InvalidArchive(f"{self.ref}: blob {digest} is longer than its {size} bytes")
                    hasher.update(block)
                    yield block
        except httpx.HTTPError as exc:
            raise TransientError(f"{self.host}: blob stream broke: {type(exc).__name__}") from exc
        finally:
            await response.aclose()
        self.stats.bytes_fetched += total
        if total != size or hasher.hexdigest() != digest.hex:
            raise InvalidArchive(f"{self.ref}: blob {digest} did not verify ({total} bytes)")

    # -- push ----------------------------------------------------------------------------------

    async def blob_exists(self, digest: Digest) -> bool:
        response = await self._request("HEAD", f"/v2/{self.ref.repository}/blobs/{digest}", kind="blob-head")
        await _release(response)
        return response.status_code == 200

    async def upload_blob(
        self, digest: Digest, size: int, read_at: BlobReader, *, chunk_bytes: int | None = None
    ) -> None:
        """Upload a blob the registry lacks. Monolithic (a session, then one PUT ?digest= streaming
        the whole body) when `chunk_bytes` is None; else chunked (a PATCH per chunk, then an empty
        PUT ?digest=), so that a failure costs a chunk's retry, not the whole body, and proxies
        that cap request bodies are never hit. A chunk is retried as it is; when the session itself
        is lost (a PATCH answered 416/404 because an earlier answer went missing) or a streamed PUT
        breaks, the upload starts over in a new session, at most UPLOAD_ATTEMPTS times. Before
        starting over, a HEAD checks whether the blob landed after all."""
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                location = await self._start_upload()
                if chunk_bytes is None:
                    body = _stream(read_at, size, UPLOAD_BLOCK_BYTES)
                    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
                    await self._finish_upload(location, digest, body, headers)
                else:
                    location = await self._patch_chunks(location, size, read_at, chunk_bytes)
                    await self._finish_upload(location, digest, b"", {"Content-Length": "0"})
                return
            except TransientError as exc:
                if await self.blob_exists(digest):
                    return  # the registry has it: only the answer was lost
                if attempt >= UPLOAD_ATTEMPTS:
                    raise
                log.warning("%s: upload of %s broke (%s); starting it over", self.ref, digest, exc)
                await self._backoff(attempt, exc)

    async def _start_upload(self) -> str:
        response = await self._request("POST", f"/v2/{self.ref.repository}/blobs/uploads/", kind="upload")
        await _release(response)
        if response.status_code not in (201, 202):
            raise SourceError(f"{self.ref}: starting an upload answered {response.status_code}")
        return self._upload_location(response)

    def _upload_location(self, response: httpx.Response) -> str:
        location: str | None = response.headers.get("location")
        if not location:
            raise SourceError(f"{self.ref}: upload session without a Location")
        return urljoin(self.base + "/", location)

    async def _patch_chunks(self, location: str, size: int, read_at: BlobReader, chunk_bytes: int) -> str:
        """PATCH the blob in order, one chunk per request; returns the session's last Location."""
        offset = 0
        async with contextlib.aclosing(_stream(read_at, size, chunk_bytes)) as blocks:
            async for data in blocks:
                end = offset + len(data) - 1
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{end}",
                    "Content-Length": str(len(data)),
                }
                response = await self._request("PATCH", location, headers=headers, content=data, kind="upload-chunk")
                await _release(response)
                if response.status_code in (400, 404, 416):
                    raise _UploadLost(
                        f"{self.ref}: upload session refused the chunk at {offset} ({response.status_code})"
                    )
                if response.status_code != 202:
                    raise SourceError(f"{self.ref}: uploading a chunk answered {response.status_code}")
                if response.headers.get("range", f"0-{end}") != f"0-{end}":
                    raise _UploadLost(f"{self.ref}: upload session holds {response.headers['range']}, not 0-{end}")
                location = self._upload_location(response)
                offset = end + 1
        return location

    async def _finish_upload(self, location: str, digest: Digest, body: Any, headers: dict[str, str]) -> None:
        url = location + ("&" if "?" in location else "?") + urlencode({"digest": str(digest)})
        response = await self._request("PUT", url, headers=headers, content=body, kind="upload")
        await _release(response)
        if response.status_code in (400, 404, 416):
            raise _UploadLost(f"{self.ref}: the upload session of {digest} was lost ({response.status_code})")
        if response.status_code != 201:
            raise SourceError(f"{self.ref}: finishing the upload of {digest} answered {response.status_code}")

    async def put_manifest(self, tag: str, body: bytes, media_type: str) -> Digest:
        response = await self._request(
            "PUT",
            f"/v2/{self.ref.repository}/manifests/{tag}",
            headers={"Content-Type": media_type},
            content=body,
            kind="manifest-put",
        )
        text = (await _read_limited(response, 1 << 16, "manifest PUT answer")).decode(errors="replace")
        await response.aclose()
        self.last_oci_subject = response.headers.get("oci-subject")  # the registry indexed `subject`
        if response.status_code != 201:
            raise SourceError(f"{self.ref}: PUT manifest answered {response.status_code}: {text[:200]}")
        return Digest.of(body)


class _CountedStream(httpx.AsyncByteStream):
    """A response body that counts its bytes into the metrics as they are read, and the request
    as in flight until the body is closed (every path here closes its responses)."""

    def __init__(self, inner: httpx.AsyncByteStream, kind: str) -> None:
        self._inner = inner
        self._bytes = metrics.HTTP_BYTES.labels(kind=kind)
        self._open = True
        metrics.HTTP_IN_FLIGHT.inc()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._bytes.inc(len(chunk))
            yield chunk

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            metrics.HTTP_IN_FLIGHT.dec()
        await self._inner.aclose()


def _tls_problem(exc: BaseException) -> str | None:
    """A one-line explanation when `exc` was caused by a TLS failure that no retry can fix."""
    cause: BaseException | None = exc
    for _ in range(16):  # bounded walk down the cause chain
        if cause is None:
            return None
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message or cause.reason or "verification failed"
            return (
                f"TLS certificate not trusted ({why}); use --ca-file for a private CA, or"
                " --insecure HOST[:PORT] to skip verification for this registry only"
            )
        if isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER":
            return "the server does not speak TLS here; use --plain-http HOST[:PORT] if it serves plain HTTP"
        cause = cause.__cause__ or cause.__context__
    return None


async def _release(response: httpx.Response) -> None:
    """Done with an answer whose body is not needed (a HEAD, a 401, a redirect, an upload's 202):
    a small body is read to its end first, so that the connection goes back to the pool. Closed
    unread, the connection is closed too, and the next request pays a new TCP (and TLS) handshake:
    a round trip after every HEAD and every 401. A large body (a whole blob answering a range)
    is never read: dropping the connection is cheaper."""
    if not response.is_stream_consumed and not response.is_closed:
        try:
            length = int(response.headers.get("content-length", "-1"))
        except ValueError:
            length = -1
        if response.request.method == "HEAD" or 0 <= length <= MAX_DRAIN_BYTES:
            with contextlib.suppress(httpx.HTTPError):
                await response.aread()
    await response.aclose()


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


async def _read_exact(response: httpx.Response, want: int, what: str) -> bytes:
    """Exactly `want` bytes of body; longer or shorter is a transient error (never data)."""
    body = await _read_body(
        response, want, what, TransientError(f"{what}: body longer than the {want} bytes asked for")
    )
    if len(body) != want:
        raise TransientError(f"{what}: body of {len(body)} bytes, expected {want}")
    return body


async def _read_limited(response: httpx.Response, limit: int, what: str) -> bytes:
    """At most `limit` bytes of body (manifests, error answers)."""
    return await _read_body(response, limit, what, InvalidArchive(f"{what}: larger than {limit} bytes"))


async def _read_body(response: httpx.Response, limit: int, what: str, too_long: BlobmountError) -> bytes:
    parts: list[bytes] = []
    got = 0
    try:
        async with _body(response) as blocks:
            async for block in blocks:
                got += len(block)
                if got > limit:
                    raise too_long
                parts.append(block)
    except httpx.HTTPError as exc:
        raise TransientError(f"{what}: body broke off after {got} bytes ({type(exc).__name__})") from exc
    return b"".join(parts)


def _body(response: httpx.Response, chunk: int | None = None) -> contextlib.aclosing[AsyncGenerator[bytes, None]]:
    """The response body, closed even when the reader stops early (no generator left to the GC)."""
    return contextlib.aclosing(cast(AsyncGenerator[bytes, None], response.aiter_bytes(chunk)))


def _short(url: str) -> str:
    parts = urlsplit(url)
    return parts.path[:120]
