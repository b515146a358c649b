"""The GET transport (registry/wire.py) against a raw HTTP server on 127.0.0.1 that answers exactly
what each test scripts: keep-alive reuse, a server that closed an idle connection, short bodies,
`Connection: close`, chunked bodies, and the answers the client's one request path must handle
(Content-Encoding, 401/307/503) without ever returning wrong bytes."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import trio

from blobmount.errors import SourceError
from blobmount.reference import Digest, Reference
from blobmount.registry.client import RegistryClient, RegistryOptions
from blobmount.registry.wire import WireTransport

BLOB = bytes(range(256)) * 400
DIGEST = Digest.of(BLOB)

Handler = Callable[[str, dict[str, str], int], tuple[bytes, bool]]  # -> (raw answer, close after)


def ranged(start: int, end: int, extra: str = "") -> bytes:
    body = BLOB[start:end]
    head = (
        f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
        f"Content-Range: bytes {start}-{end - 1}/{len(BLOB)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def parse_range(headers: dict[str, str]) -> tuple[int, int]:
    first, last = headers["range"].removeprefix("bytes=").split("-")
    return int(first), int(last) + 1


class RawServer:
    """One thread per connection; `handler` sees (request line, headers, connection number)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                line, *rest = head.decode().split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest)}
                self.requests.append(line)
                answer, close = self.handler(line, headers, number)
                conn.sendall(answer)
                if close:
                    return

    def close(self) -> None:
        self.sock.close()


@contextmanager
def server(handler: Handler) -> Iterator[RawServer]:
    s = RawServer(handler)
    try:
        yield s
    finally:
        s.close()


def read_via_client(port: int, ranges: list[tuple[int, int]]) -> list[bytes]:
    ref = Reference.parse(f"127.0.0.1:{port}/team/assets:v1")

    async def go() -> list[bytes]:
        client = RegistryClient(ref, RegistryOptions(timeout_s=10), max_attempts=2)
        try:
            return [await client.read_range(DIGEST, a, b, len(BLOB)) for a, b in ranges]
        finally:
            await client.aclose()

    return trio.run(go)


def test_keep_alive_connections_are_reused() -> None:
    with server(lambda line, h, n: (ranged(*parse_range(h)), False)) as s:
        got = read_via_client(s.port, [(0, 100), (5000, 90000), (7, 8)])
        assert got == [BLOB[0:100], BLOB[5000:90000], BLOB[7:8]]
        assert s.connections == 1


def test_an_idle_connection_the_server_closed_is_retried_on_a_fresh_one() -> None:
    with server(lambda line, h, n: (ranged(*parse_range(h)), True)) as s:  # closes after every answer
        assert read_via_client(s.port, [(0, 10), (10, 20), (20, 30)]) == [BLOB[0:10], BLOB[10:20], BLOB[20:30]]
        assert s.connections >= 3


def test_connection_close_is_honoured() -> None:
    answer = lambda line, h, n: (ranged(*parse_range(h), extra="Connection: close\r\n"), False)  # noqa: E731
    with server(answer) as s:
        assert read_via_client(s.port, [(0, 10), (10, 20)]) == [BLOB[0:10], BLOB[10:20]]
        assert s.connections == 2


def test_a_short_body_is_a_transient_error_and_the_retry_succeeds() -> None:
    def answer(line: str, h: dict[str, str], n: int) -> tuple[bytes, bool]:
        full = ranged(*parse_range(h))
        return (full[:-500], True) if n == 1 else (full, False)

    with server(answer) as s:
        assert read_via_client(s.port, [(0, 4000)]) == [BLOB[:4000]]
        assert len(s.requests) == 2


def test_the_transport_reports_a_short_body() -> None:
    with server(lambda line, h, n: (ranged(0, 1000)[:-10], True)) as s:

        async def go() -> None:
            transport = WireTransport(ssl.create_default_context(), httpx.AsyncHTTPTransport())
            async with httpx.AsyncClient(transport=transport) as client:
                request = client.build_request("GET", f"http://127.0.0.1:{s.port}/x", headers={"Range": "bytes=0-999"})
                response = await client.send(request, stream=True)
                assert response.status_code == 206
                with pytest.raises(httpx.RemoteProtocolError, match="connection closed with 10 body bytes left"):
                    async for _ in response.aiter_raw():
                        pass
                await response.aclose()
                assert all(not pool._idle for pool in transport._pools.values())  # never reused

        trio.run(go)


def test_chunked_and_unusual_answers_go_through_httpx() -> None:
    """A chunked body and a 503 on the way: the same request path serves the same bytes."""

    def answer(line: str, h: dict[str, str], n: int) -> tuple[bytes, bool]:
        start, end = parse_range(h)
        count = len(s.requests)
        if count == 1:  # chunked
            body = BLOB[start:end]
            chunks = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
            head = (
                "HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n"
                f"Content-Range: bytes {start}-{end - 1}/{len(BLOB)}\r\n\r\n"
            )
            return head.encode() + chunks, False
        if count == 3:
            return b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nRetry-After: 0\r\n\r\n", False
        return ranged(start, end), False

    with server(answer) as s:
        assert read_via_client(s.port, [(10, 3000), (3000, 3100)]) == [BLOB[10:3000], BLOB[3000:3100]]


def test_a_range_answered_with_content_encoding_is_never_read_as_data() -> None:
    def answer(line: str, h: dict[str, str], n: int) -> tuple[bytes, bool]:
        return ranged(*parse_range(h), extra="Content-Encoding: gzip\r\n"), False

    with server(answer) as s, pytest.raises(SourceError, match="Content-Encoding"):
        read_via_client(s.port, [(0, 100)])


def test_a_cookie_set_on_a_range_answer_goes_with_the_next_request() -> None:
    """Range GETs skip httpx's client layers (transport.py, _send_direct) but keep its cookies: a
    load balancer's sticky cookie set on one answer is sent with the next request."""
    seen: list[str | None] = []

    def answer(line: str, h: dict[str, str], n: int) -> tuple[bytes, bool]:
        seen.append(h.get("cookie"))
        extra = "Set-Cookie: lb=node1; Path=/\r\n" if len(seen) == 1 else ""
        return ranged(*parse_range(h), extra=extra), False

    with server(answer) as s:
        assert read_via_client(s.port, [(0, 10), (10, 20)]) == [BLOB[0:10], BLOB[10:20]]
    assert seen == [None, "lb=node1"]


def test_range_gets_go_straight_to_the_wire_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cheaper path for GETs (transport.py, _send_direct) is the one taken: httpx's
    AsyncClient.send, made to fail here, is never called for them."""

    async def refuse(*args: object, **kwargs: object) -> httpx.Response:
        raise AssertionError("a GET went through httpx.AsyncClient.send")

    monkeypatch.setattr(httpx.AsyncClient, "send", refuse)
    with server(lambda line, h, n: (ranged(*parse_range(h)), False)) as s:
        assert read_via_client(s.port, [(0, 100), (100, 4000)]) == [BLOB[0:100], BLOB[100:4000]]


def test_a_body_that_stalls_is_a_read_timeout() -> None:
    """The wire's one translation (_translated): a receive that waits past the read timeout is
    httpx's ReadTimeout, with the cause chained."""
    with server(lambda line, h, n: (ranged(0, 1000)[:-10], False)) as s:  # 10 bytes never come

        async def go() -> None:
            transport = WireTransport(ssl.create_default_context(), httpx.AsyncHTTPTransport())
            async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, read=0.3)) as client:
                request = client.build_request("GET", f"http://127.0.0.1:{s.port}/x", headers={"Range": "bytes=0-999"})
                response = await client.send(request, stream=True)
                with pytest.raises(httpx.ReadTimeout, match=r"no data within 0\.3 s") as info:
                    async for _ in response.aiter_raw():
                        pass
                assert isinstance(info.value.__cause__, trio.TooSlowError)
                await response.aclose()

        trio.run(go)
