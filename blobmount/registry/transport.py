"""HTTP for the registry client: the httpx clients and their TLS contexts, the one translation of
httpx's exceptions into the errors.py tree (with the cause chained), and the HTTP metrics.

Every request any part of registry/ makes is sent by :meth:`Transport.send`, and every response
body is read through :func:`translated` (or the readers built on it): nowhere else catches an httpx
exception. A request is counted once by kind and status code; its body's bytes are counted as they
are read, and it is in flight until the body is closed. 429 and 5xx answers become
:class:`~blobmount.registry.retry.RetryLater` here, so that every retry loop sees the same errors.

The bytes themselves move over :class:`~blobmount.registry.wire.WireTransport` (GETs, in large
receives) unless a proxy applies or a test injects a transport; that choice changes nothing above.
"""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpcore  # noqa: F401  httpx loads it with the first client; here it is loaded before a mount's first request
import httpx

from blobmount import __version__
from blobmount.daemon import metrics
from blobmount.errors import BlobmountError, InvalidArchive, SourceError, TransientError
from blobmount.registry.options import RegistryOptions
from blobmount.registry.retry import RetryLater, parse_retry_after
from blobmount.registry.wire import WireTransport

CONNECT_TIMEOUT_S = 10.0
MAX_DRAIN_BYTES = 64 << 10  # an unneeded body up to this size is read so its connection is reused
USER_AGENT = f"blobmount/{__version__}"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_URLS = 256  # parsed URLs kept per Transport (a blob's, its storage URL's, a few manifests')


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


def _proxied(host: str | None) -> bool:
    """Whether an environment proxy applies to `host` (None: to any host at all)."""
    proxies = urllib.request.getproxies_environment()
    if not proxies:
        return False
    return host is None or not urllib.request.proxy_bypass(host)


@dataclass(slots=True)
class Stats:
    requests: int = 0
    bytes_fetched: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.requests += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


class Transport:
    """The httpx clients of one registry client: one for the registry itself (its --insecure and
    --ca-file), one for other hosts (storage, token realms; TLS always verified), one for plain
    HTTP elsewhere. Each is made on first use: a plain-HTTP registry never loads a CA store."""

    def __init__(
        self,
        base: str,
        options: RegistryOptions,
        *,
        insecure: bool,
        ca_file: Path | None,
        transport: httpx.AsyncBaseTransport | None,
        stats: Stats,
    ) -> None:
        """`transport` is the test seam (httpx.MockTransport); None: the network."""
        self.base = base
        self.options = options
        self.stats = stats
        self._insecure = insecure
        self._ca_file = ca_file
        self._transport = transport
        self._registry: httpx.AsyncClient | None = None
        self._storage: httpx.AsyncClient | None = None
        self._plain: httpx.AsyncClient | None = None
        self._wire: dict[httpx.AsyncClient, WireTransport] = {}  # clients whose every request is ours
        self._urls: dict[str, httpx.URL] = {}  # parsed once: a blob's URL is asked for thousands of times

    def _client_for(self, url: str, to_registry: bool) -> httpx.AsyncClient:
        if to_registry:
            if self._registry is None:
                verify: ssl.SSLContext | bool = _plain_verify()
                if self.base.startswith("https:"):
                    verify = _unverified_context() if self._insecure else self._trust(self._ca_file)
                self._registry = self._new_client(verify, urlsplit(self.base).hostname)
            return self._registry
        if url.startswith("http:"):
            if self._plain is None:
                self._plain = self._new_client(_plain_verify(), None)
            return self._plain
        if self._storage is None:  # never this registry's --insecure; --ca-file only adds trust
            self._storage = self._new_client(self._trust(self.options.ca_file), None)
        return self._storage

    @staticmethod
    def _trust(ca_file: Path | None) -> ssl.SSLContext:
        return tls_context(str(ca_file) if ca_file else None)

    def _new_client(self, verify: ssl.SSLContext | bool, host: str | None) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.options.max_connections)
        transport = self._transport
        if transport is None and not _proxied(host):
            context = verify if isinstance(verify, ssl.SSLContext) else _unverified_context()
            fallback = httpx.AsyncHTTPTransport(verify=verify, limits=limits)
            transport = WireTransport(context, fallback, max_idle=self.options.max_connections)
        client = httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(self.options.timeout_s, connect=CONNECT_TIMEOUT_S),
            limits=limits,
            follow_redirects=False,
            trust_env=True,  # HTTP(S)_PROXY / NO_PROXY (without our transport: httpx's proxies)
            headers={"User-Agent": USER_AGENT},
            transport=transport,
        )
        if isinstance(transport, WireTransport):
            self._wire[client] = transport
        return client

    async def aclose(self) -> None:
        for client in (self._registry, self._storage, self._plain):
            if client is not None:
                await client.aclose()
        self._registry = self._storage = self._plain = None
        self._wire.clear()

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: Any = None,
        kind: str,
        to_registry: bool = True,
    ) -> httpx.Response:
        """One HTTP exchange with the body streamed: errors translated (the one place), counted;
        429/5xx raised as RetryLater after their body is released. Nothing is retried here."""
        client = self._client_for(url, to_registry)
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= MAX_URLS:
                self._urls.clear()
            parsed = self._urls[url] = httpx.URL(url)
        request = client.build_request(method, parsed, headers=dict(headers or {}), content=content)
        self.stats.count(kind)
        host = parsed.netloc.decode("ascii", "replace")
        wire = self._wire.get(client)
        try:
            with translated(host):
                if wire is not None and content is None and method in ("GET", "HEAD") and not parsed.userinfo:
                    response = await _send_direct(client, wire, request)
                else:
                    response = await client.send(request, stream=True)
        except BlobmountError:
            metrics.HTTP_REQUESTS.labels(kind=kind, code="error").inc()
            raise
        status = response.status_code
        metrics.HTTP_REQUESTS.labels(kind=kind, code=str(status)).inc()
        if response.is_closed:  # read eagerly (in-memory transports): nothing left in flight
            metrics.HTTP_BYTES.labels(kind=kind).inc(len(response.content))
        elif isinstance(response.stream, httpx.AsyncByteStream):
            response.stream = _CountedStream(response.stream, kind)
        if status in RETRY_STATUSES:
            await release(response)
            raise RetryLater(
                f"{host}: {method} answered {status}", parse_retry_after(response.headers.get("retry-after")), status
            )
        return response


async def _send_direct(client: httpx.AsyncClient, wire: WireTransport, request: httpx.Request) -> httpx.Response:
    """``client.send(request, stream=True)`` for a request our transport carries, without the
    layers of httpx's client that do nothing for it: its auth flow (the client has no auth and
    the URL no userinfo: Authorization is session.py's), redirects (never followed by the
    client: client.py follows them), event hooks (none), the elapsed timer and the log line; its
    cookies are still kept. Those layers cost about a third of the CPU of a 32 KiB range
    request (py-spy, /tmp micro-benchmark of RegistryClient.iter_range on loopback)."""
    response = await wire.handle_async_request(request)
    try:
        if "set-cookie" in response.headers:
            client.cookies.extract_cookies(response)
    except BaseException:
        await response.aclose()
        raise
    return response


@contextlib.contextmanager
def translated(where: str, what: str = "") -> Iterator[None]:
    """The one translation of httpx's exceptions: a TLS failure no retry can fix is a SourceError
    saying what to do; network failures, timeouts and broken bodies are TransientError; anything
    else httpx raises is a SourceError. `what` prefixes the message (e.g. "body broke off")."""
    try:
        yield
    except httpx.ConnectError as exc:
        problem = _tls_problem(exc)
        if problem is not None:  # retrying cannot fix a certificate: say so, and how to proceed
            raise SourceError(f"{where}: {problem}") from exc
        raise TransientError(f"{where}: {what}{type(exc).__name__}: {exc}") from exc
    except httpx.TimeoutException as exc:
        raise TransientError(f"{where}: {what}timed out ({type(exc).__name__})") from exc
    except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
        raise TransientError(f"{where}: {what}{type(exc).__name__}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise SourceError(f"{where}: {what}{type(exc).__name__}: {exc}") from exc


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


async def release(response: httpx.Response) -> None:
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
            with contextlib.suppress(BlobmountError), translated(response.url.netloc.decode("ascii", "replace")):
                await response.aread()
    await response.aclose()


def raw_blocks(response: httpx.Response, chunk: int | None) -> contextlib.aclosing[AsyncGenerator[bytes, None]]:
    """The body undecoded (callers check Content-Encoding first) in blocks of `chunk` bytes,
    closed even when the reader stops early. Blocks of a fixed size: a body that overruns is
    noticed at a block boundary, with the stream below read to its end when it is that short (no
    half-read stream is left to the garbage collector). A body read eagerly (in-memory
    transports) is handed out from memory."""
    if response.is_stream_consumed:
        return _body(response, chunk)
    return contextlib.aclosing(cast(AsyncGenerator[bytes, None], response.aiter_raw(chunk)))


def _body(response: httpx.Response, chunk: int | None = None) -> contextlib.aclosing[AsyncGenerator[bytes, None]]:
    """The response body, decoded, closed even when the reader stops early."""
    return contextlib.aclosing(cast(AsyncGenerator[bytes, None], response.aiter_bytes(chunk)))


async def stream_body(response: httpx.Response, what: str, chunk: int | None = None) -> AsyncIterator[bytes]:
    """The body in blocks; a break is TransientError."""
    with translated(response.url.netloc.decode("ascii", "replace"), f"{what}: body broke off: "):
        async with _body(response, chunk) as blocks:
            async for block in blocks:
                yield block


async def read_exact(response: httpx.Response, want: int, what: str) -> bytes:
    """Exactly `want` bytes of body; longer or shorter is a transient error (never data)."""
    body = await _read_body(
        response, want, what, TransientError(f"{what}: body longer than the {want} bytes asked for")
    )
    if len(body) != want:
        raise TransientError(f"{what}: body of {len(body)} bytes, expected {want}")
    return body


async def read_limited(response: httpx.Response, limit: int, what: str) -> bytes:
    """At most `limit` bytes of body (manifests, error answers)."""
    return await _read_body(response, limit, what, InvalidArchive(f"{what}: larger than {limit} bytes"))


async def _read_body(response: httpx.Response, limit: int, what: str, too_long: BlobmountError) -> bytes:
    parts: list[bytes] = []
    got = 0
    with translated(response.url.netloc.decode("ascii", "replace"), f"{what}: body broke off: "):
        async with _body(response) as blocks:
            async for block in blocks:
                got += len(block)
                if got > limit:
                    raise too_long
                parts.append(block)
    return b"".join(parts)
