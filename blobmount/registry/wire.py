"""An httpx transport of our own for GET requests over HTTP/1.1: the request the data path makes
thousands of times (a blob's byte range, answered ``206`` with a ``Content-Length`` body).

Why not httpx's own transport for these: streaming a 1 GiB range body on loopback cost 2.25 CPU-s
through ``aiter_bytes`` and 1.24 through ``aiter_raw`` (httpcore reads 64 KiB at a time through
h11), against 0.34 CPU-s reading the socket directly in 1 MiB receives (same machine, same run).
Re-measured as a transport under the same client code (bench/wire_transport.py, 256 MiB in 8 MiB
ranges from docker-registry on 127.0.0.1, 3 interleaved runs, client process CPU): this transport
0.64 CPU-s/GiB, httpx's 1.62, httpx's with httpcore's private read size raised to 1 MiB 0.94 (not
shippable: a private attribute). The daemon's whole CPU budget per GiB is a few seconds, and the
network body is most of it.

It is a transport, below httpx's client: every request still goes through the registry client's
one request path (auth, redirects, answer checks, metrics, retries); this module only moves bytes.
It speaks GET and HEAD only (keep-alive connections per origin, plain or TLS with the client's own SSL
context; bodies by ``Content-Length``, chunked, or until close); every other method goes to
httpx's transport (``fallback``). Proxies are httpx's business: transport.py does not install this
transport on a client that an ``HTTP(S)_PROXY`` applies to.

Errors are raised as httpx's (ConnectError, ConnectTimeout, ReadTimeout, ReadError,
RemoteProtocolError), with the cause chained, so that transport.py's one translation sees the
same exceptions whichever transport moved the bytes.
"""

from __future__ import annotations

import contextlib
import math
import ssl
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import httpx
import trio

MAX_HEAD_BYTES = 64 << 10  # a status line plus headers larger than this is not a registry's
RECEIVE_BYTES = 1 << 20  # per receive: amortizes the per-call cost, which dominates at 64 KiB
HEAD_RECEIVE_BYTES = 16 << 10  # per receive until the headers are in
MAX_CHUNK_LINE_BYTES = 4 << 10  # a chunk-size line (with extensions) longer than this is not HTTP


class _translated:
    """Socket and TLS failures as httpx's exceptions; `read_s` bounds the wait (None: unbounded).

    A class rather than ``contextlib.contextmanager`` around ``trio.fail_after``: it wraps every
    send and receive, and the two generator-based managers cost about a tenth of the CPU of a
    32 KiB range request (py-spy); one cancel scope does the same."""

    __slots__ = ("_read_s", "_request", "_scope")

    def __init__(self, request: httpx.Request, read_s: float | None = None) -> None:
        self._request, self._read_s = request, read_s
        deadline = trio.current_time() + read_s if read_s is not None else math.inf
        self._scope = trio.CancelScope(deadline=deadline)

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(
        self, etype: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self._scope.__exit__(etype, exc, tb)  # swallows only its own Cancelled: cancelled_caught
        if self._scope.cancelled_caught:
            timeout = httpx.ReadTimeout(f"no data within {self._read_s} s", request=self._request)
            raise timeout from trio.TooSlowError()
        if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)):
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=self._request) from exc


@dataclass(eq=False)
class _Conn:
    stream: trio.abc.Stream
    reused: bool = False


class _Body(httpx.AsyncByteStream):
    """A response body read from the socket in large receives; the connection goes back to the
    pool only when the body was read to its end."""

    def __init__(
        self, pool: _Pool, conn: _Conn, request: httpx.Request, pending: bytes, length: int, chunked: bool, keep: bool
    ) -> None:
        self._pool, self._conn, self._request = pool, conn, request
        self._pending = pending  # body bytes that arrived with the headers
        self._length = length  # Content-Length, or -1 (chunked, or until the connection closes)
        self._chunked = chunked
        self._keep = keep
        self._done = length == 0
        self._read_s = _timeout(request, "read")

    async def _receive(self, limit: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:limit], self._pending[limit:]
            return data
        with _translated(self._request, self._read_s):
            # bytes from a socket, a bytearray from TLS: both are what consumers need (len, +=)
            return cast(bytes, await self._conn.stream.receive_some(limit))

    async def _line(self) -> bytes:
        buf = b""
        while b"\r\n" not in buf:
            data = await self._receive(HEAD_RECEIVE_BYTES)
            if not data:
                raise httpx.RemoteProtocolError("connection closed inside a chunked body", request=self._request)
            buf += data
            if len(buf) > MAX_CHUNK_LINE_BYTES and b"\r\n" not in buf:
                raise httpx.RemoteProtocolError("chunk-size line too long", request=self._request)
        line, _, rest = buf.partition(b"\r\n")
        self._pending = rest + self._pending
        return line

    async def _exactly(self, remaining: int, block_bytes: int) -> AsyncIterator[bytes]:
        while remaining > 0:
            data = await self._receive(min(block_bytes, remaining))
            if not data:
                self._keep = False
                raise httpx.RemoteProtocolError(
                    f"connection closed with {remaining} body bytes left", request=self._request
                )
            remaining -= len(data)
            yield data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._done:
            return
        if self._length >= 0:
            async for data in self._exactly(self._length, RECEIVE_BYTES):
                yield data
        elif self._chunked:
            while True:
                size_text = (await self._line()).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise httpx.RemoteProtocolError("malformed chunk size", request=self._request) from None
                if size == 0:
                    while await self._line():  # trailers, up to the empty line
                        pass
                    break
                async for data in self._exactly(size, RECEIVE_BYTES):
                    yield data
                if await self._line():
                    raise httpx.RemoteProtocolError("chunk not followed by CRLF", request=self._request)
        else:
            self._keep = False  # the body ends with the connection
            while data := await self._receive(RECEIVE_BYTES):
                yield data
        self._done = True

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is None:
            return
        if not (self._done and not self._pending and self._keep and self._pool.keep(conn)):
            await self._pool.discard(conn)


def _timeout(request: httpx.Request, which: str) -> float | None:
    value = request.extensions.get("timeout", {}).get(which)
    return float(value) if value is not None else None


@dataclass(eq=False)
class _Pool:
    """Keep-alive connections to one origin (scheme, host, port)."""

    scheme: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None  # None for plain HTTP
    max_idle: int = 8
    _idle: list[_Conn] = field(default_factory=list)

    async def _connect(self, request: httpx.Request) -> _Conn:
        """A new connection (TLS handshake done), or the TCP socket closed again."""
        connect_s = _timeout(request, "connect")
        tcp: trio.abc.Stream | None = None
        stream: trio.abc.Stream
        try:
            with trio.fail_after(connect_s if connect_s is not None else float("inf")):
                tcp = stream = await trio.open_tcp_stream(self.host, self.port)
                if self.ssl_context is not None:
                    tls = trio.SSLStream(tcp, self.ssl_context, server_hostname=self.host, https_compatible=True)
                    await tls.do_handshake()
                    stream = tls
        except BaseException:
            if tcp is not None:  # a failed handshake must not leave the socket to the GC (the server waits)
                await self.discard(_Conn(tcp))
            raise
        return _Conn(stream)

    async def _open(self, request: httpx.Request) -> _Conn:
        try:
            return await self._connect(request)
        except trio.TooSlowError as exc:
            raise httpx.ConnectTimeout("no connection within the connect timeout", request=request) from exc
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}", request=request) from exc

    def keep(self, conn: _Conn) -> bool:
        """Park a connection whose last response was read to its end (False: the pool is full)."""
        if len(self._idle) >= self.max_idle:
            return False
        conn.reused = True
        self._idle.append(conn)
        return True

    async def discard(self, conn: _Conn) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(Exception), trio.move_on_after(1):
            await conn.stream.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await self.discard(conn)

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send one GET (or HEAD) and read its status line and headers. A reused connection that the server
        had already closed is retried once on a fresh one (nothing was sent that could matter)."""
        lines = [f"{request.method} {request.url.raw_path.decode('ascii')} HTTP/1.1"]
        lines += [f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in request.headers.raw]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for attempt in range(2):
            conn = self._idle.pop() if self._idle and not attempt else await self._open(request)
            try:
                with _translated(request, _timeout(request, "read")):
                    await conn.stream.send_all(head)
                return await self._read_head(conn, request)
            except httpx.TransportError:
                await self.discard(conn)
                if not conn.reused or attempt:
                    raise
                await self.aclose()  # the other idle connections are likely as dead: a fresh one
            except BaseException:
                await self.discard(conn)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_head(self, conn: _Conn, request: httpx.Request) -> httpx.Response:
        buf = b""
        while b"\r\n\r\n" not in buf:
            # small receives: what comes with the headers is read before we know the answer is one
            # we want (an unwanted body is dropped with the connection, not read)
            with _translated(request, _timeout(request, "read")):
                data = await conn.stream.receive_some(HEAD_RECEIVE_BYTES)
            if not data:
                raise httpx.RemoteProtocolError("connection closed before a response", request=request)
            buf += data
            if len(buf) > MAX_HEAD_BYTES and b"\r\n\r\n" not in buf[:MAX_HEAD_BYTES]:
                raise httpx.RemoteProtocolError(f"response headers larger than {MAX_HEAD_BYTES} bytes", request=request)
        head, _, rest = buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(f"not an HTTP/1.x answer: {status_line[:80]!r}", request=request)
        headers: list[tuple[str, str]] = []
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers.append((name.strip(), value.strip()))
        lower = {k.lower(): v for k, v in headers}
        status = int(parts[1])
        keep = parts[0] != "HTTP/1.0" and lower.get("connection", "").lower() != "close"
        chunked = "chunked" in lower.get("transfer-encoding", "").lower()
        length_text = lower.get("content-length")
        length = int(length_text) if length_text is not None and length_text.isdigit() and not chunked else -1
        if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            length, chunked = 0, False
        if length >= 0 and len(rest) > length:  # bytes beyond this body: never reuse the connection
            rest, keep = rest[:length], False
        body = _Body(self, conn, request, rest, length, chunked, keep)
        reason = parts[2] if len(parts) > 2 else ""
        return httpx.Response(
            status,
            headers=headers,
            stream=body,
            request=request,
            extensions={"http_version": parts[0].encode(), "reason_phrase": reason.encode("latin-1")},
        )


class WireTransport(httpx.AsyncBaseTransport):
    """GET and HEAD over our own HTTP/1.1 connections (the same connections for both: a tag's HEAD
    and the manifest GET after it share one handshake); other methods through `fallback`."""

    def __init__(self, ssl_context: ssl.SSLContext, fallback: httpx.AsyncBaseTransport, max_idle: int = 8) -> None:
        self._ssl_context = ssl_context  # for https:// origins (the client's own trust settings)
        self._fallback = fallback
        self._max_idle = max_idle
        self._pools: dict[tuple[str, str, int], _Pool] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        if request.method not in ("GET", "HEAD") or has_body or url.scheme not in ("http", "https") or not url.host:
            return await self._fallback.handle_async_request(request)
        port = url.port or (443 if url.scheme == "https" else 80)
        key = (url.scheme, url.host, port)
        pool = self._pools.get(key)
        if pool is None:
            context = self._ssl_context if url.scheme == "https" else None
            pool = self._pools[key] = _Pool(url.scheme, url.host, port, context, self._max_idle)
        return await pool.send(request)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()
        await self._fallback.aclose()
