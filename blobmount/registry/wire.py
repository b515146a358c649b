"""A small HTTP/1.1 client for the one request the data path makes thousands of times: a GET of a
blob's byte range, answered ``206`` with a ``Content-Length`` body.

Why not httpx for this: streaming a 1 GiB range body on loopback cost 2.25 CPU-s through
``aiter_bytes`` and 1.24 through ``aiter_raw`` (httpcore reads 64 KiB at a time through h11), against
0.34 CPU-s reading the socket directly in 1 MiB receives (same machine, same run). The daemon's
whole CPU budget per GiB is a few seconds, and the network body is most of it.

So this module does only that: keep-alive connections per origin (plain or TLS, with the client's
own SSL context), one GET with the caller's headers, the status line and headers parsed, and the
body streamed in large receives with its length checked. Anything it does not handle itself
(chunked bodies, 401 challenges, redirects, 429/5xx) is returned to the caller as an ordinary
response, which the registry client then re-sends through httpx, where auth, redirects and retries
live. Proxies (``HTTP(S)_PROXY``) are httpx's business too: the client does not use this path for a
host a proxy applies to.

Errors: every socket or TLS failure becomes TransientError (the caller retries or resumes); a body
that ends early is TransientError as well. Only RegistryClient (client.py) uses this module.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

import trio

from blobmount.errors import TransientError

MAX_HEAD_BYTES = 64 << 10  # a status line plus headers larger than this is not a registry's
RECEIVE_BYTES = 1 << 20  # per receive: amortizes the per-call cost, which dominates at 64 KiB
HEAD_RECEIVE_BYTES = 16 << 10  # per receive until the headers are in
CONNECT_TIMEOUT_S = 10.0


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
        raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc


@dataclass(eq=False)
class _Conn:
    stream: trio.abc.Stream
    reused: bool = False


@dataclass(eq=False)
class WireResponse:
    """A response whose body has not been read yet (``remaining`` bytes of it are to come)."""

    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    _pool: WirePool
    _conn: _Conn | None
    _pending: bytes  # body bytes that arrived with the headers
    remaining: int  # body bytes still to read (-1: not a Content-Length body)
    _keep_alive: bool = True

    async def iter_body(self, block_bytes: int = RECEIVE_BYTES) -> AsyncGenerator[bytes, None]:
        """The body, as it arrives. Raises TransientError when the connection ends early."""
        if self.remaining < 0:
            raise TransientError(f"{self._pool.netloc}: body without Content-Length")
        if self._pending:
            data, self._pending = self._pending, b""
            self.remaining -= len(data)
            yield data
        while self.remaining > 0:
            assert self._conn is not None
            with _translated(self._pool.netloc):
                # bytes from a socket, a bytearray from TLS: both are what consumers need (len, +=)
                data = cast(bytes, await self._conn.stream.receive_some(min(block_bytes, self.remaining)))
            if not data:
                self._keep_alive = False
                raise TransientError(f"{self._pool.netloc}: connection closed with {self.remaining} body bytes left")
            self.remaining -= len(data)
            yield data

    async def aclose(self) -> None:
        """Give the connection back when the body was read to its end, else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not (self.remaining == 0 and not self._pending and self._keep_alive and self._pool.keep(conn)):
            await self._pool.discard(conn)


@dataclass(eq=False)
class WirePool:
    """Keep-alive connections to one origin (scheme, host, port)."""

    scheme: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None  # None for plain HTTP
    user_agent: str
    max_idle: int = 8
    _idle: list[_Conn] = field(default_factory=list)

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    async def _connect(self) -> _Conn:
        with _translated(self.netloc), trio.fail_after(CONNECT_TIMEOUT_S):
            stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
            if self.ssl_context is not None:
                tls = trio.SSLStream(stream, self.ssl_context, server_hostname=self.host, https_compatible=True)
                await tls.do_handshake()
                stream = tls
        return _Conn(stream)

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

    async def get(self, target: str, headers: Mapping[str, str]) -> WireResponse:
        """Send one GET and read its status line and headers. A reused connection that the server
        had already closed is retried once on a fresh one (nothing was sent that could matter)."""
        lines = [f"GET {target} HTTP/1.1", f"Host: {self.netloc}", f"User-Agent: {self.user_agent}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for attempt in range(2):
            conn = self._idle.pop() if self._idle and not attempt else await self._connect()
            try:
                with _translated(self.netloc):
                    await conn.stream.send_all(request)
                    return await self._read_head(conn)
            except TransientError:
                await self.discard(conn)
                if not conn.reused or attempt:
                    raise
                await self.aclose()  # the other idle connections are likely as dead: a fresh one
            except BaseException:
                await self.discard(conn)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_head(self, conn: _Conn) -> WireResponse:
        buf = b""
        while b"\r\n\r\n" not in buf:
            # small receives: what comes with the headers is read before we know the answer is one
            # we want (an unwanted body is dropped with the connection, not read)
            data = await conn.stream.receive_some(HEAD_RECEIVE_BYTES)
            if not data:
                raise TransientError(f"{self.netloc}: connection closed before a response")
            buf += data
            if len(buf) > MAX_HEAD_BYTES and b"\r\n\r\n" not in buf[:MAX_HEAD_BYTES]:
                raise TransientError(f"{self.netloc}: response headers larger than {MAX_HEAD_BYTES} bytes")
        head, _, rest = buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise TransientError(f"{self.netloc}: not an HTTP/1.x answer: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        keep_alive = parts[0] != "HTTP/1.0" and headers.get("connection", "").lower() != "close"
        length = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        remaining = int(length) if length is not None and length.isdigit() and not chunked else -1
        if remaining >= 0 and len(rest) > remaining:  # bytes beyond this body: never reuse the connection
            rest, keep_alive = rest[:remaining], False
        return WireResponse(int(parts[1]), headers, self, conn, rest, remaining, keep_alive)
