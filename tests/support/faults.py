"""Fault injection in front of a real docker-registry: :class:`FaultProxy` is the QuirkProxy of
tests/support/servers.py (bearer tokens, redirects, 200-for-range) plus faults a test switches on per
request, path and count, and switches off again to prove that nothing stays broken.

Faults act at two points. Before the upstream is asked (``PRE``): a status (500/502/503/404/429
with ``Retry-After``), a stall with no byte at all, a redirect loop, a connection closed without an
answer. On the upstream's answer (``POST``): reset mid-body (RST), truncated body (the
Content-Length promises more, then FIN), a stall after half the body, a slow drip, a wrong
``Content-Range``, a body longer than asked, one byte flipped. Connection refused is the whole
proxy going :meth:`FaultProxy.down` (listener closed, live connections cut) and :meth:`up` again on
the same port. DNS failure lives in tests/support/resolver.py (the resolver is the transport seam).

Every fault counts its ``hits``: a test asserts the fault was actually met, so that a change in
request patterns (a cache, read-ahead) can never turn a fault test into one that proves nothing.
Stalls wait on an event that :meth:`FaultProxy.clear` and :meth:`FaultProxy.stop` set, so no
proxy thread outlives its test by more than a moment.
"""

from __future__ import annotations

import contextlib
import enum
import http.server
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.support.servers import QuirkProxy

STALL_MAX_S = 120.0  # a stall ends by itself after this, whatever the test does
DRIP_BLOCK_BYTES = 1024


class Kind(enum.Enum):
    STATUS = "status"  # answer `status` (`retry_after`, `headers`, `body`) instead of the registry
    STALL = "stall"  # accept the request, send nothing
    REDIRECT_LOOP = "redirect-loop"  # 307 to the very same URL
    CLOSE = "close"  # close the connection without an answer
    RESET = "reset"  # headers + half the body, then RST
    TRUNCATE = "truncate"  # headers (full Content-Length) + half the body, then FIN
    STALL_BODY = "stall-body"  # headers + half the body, then silence
    DRIP = "drip"  # the body at `rate_bps` bytes per second
    CONTENT_RANGE = "content-range"  # Content-Range shifted by one byte
    LONGER = "longer"  # more body than the range asked for (Content-Length matches the body)
    FLIP = "flip"  # one bit of the body flipped (headers intact)
    REPLACE = "replace"  # the body replaced by `body` (a hostile manifest, say); status kept


PRE = frozenset({Kind.STATUS, Kind.STALL, Kind.REDIRECT_LOOP, Kind.CLOSE})


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names

    @property
    def range(self) -> tuple[int, int] | None:
        """[start, end) of a single-range request, else None."""
        value = self.headers.get("range", "")
        if not value.startswith("bytes="):
            return None
        first, _, last = value[6:].partition("-")
        try:
            return int(first), int(last) + 1
        except ValueError:
            return None


Match = Callable[[Request], bool]


def any_request(req: Request) -> bool:
    return True


def _content_range_start(headers: dict[str, str]) -> int | None:
    for k, v in headers.items():
        if k.lower() == "content-range":
            first = v.strip().removeprefix("bytes ").partition("-")[0]
            return int(first) if first.isdigit() else None
    return None


def blob(digest: str, start: int | None = None, end: int | None = None) -> Match:
    """GETs of blob `digest` (redirected storage URLs included); with `start`/`end`, only range
    requests overlapping [start, end)."""

    def match(req: Request) -> bool:
        if req.method != "GET" or f"/blobs/{digest}" not in req.path:
            return False
        if start is None or end is None:
            return True
        rng = req.range
        return rng is not None and rng[0] < end and start < rng[1]

    return match


def path_prefix(prefix: str) -> Match:
    return lambda req: req.path.startswith(prefix)


@dataclass(slots=True)
class Fault:
    kind: Kind
    match: Match = any_request
    times: int | None = None  # None: until cleared
    probability: float = 1.0
    status: int = 503
    retry_after: str | None = None
    stall_s: float = STALL_MAX_S
    rate_bps: int = 1024
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    at: int | None = None  # FLIP: the blob offset whose bit flips (when the body covers it)
    outlives_clear: bool = False  # STALL/STALL_BODY: a dead connection (a blackholed link): clear()
    # lets new requests through but does not end this stall; it lasts `stall_s` (or until stop())
    hits: int = 0
    stalled: int = 0  # STALL/STALL_BODY: answers being held right now (the client hung up: not held)


@dataclass(slots=True)
class _Active:
    faults: list[Fault] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


class FaultProxy(QuirkProxy):
    """QuirkProxy + faults. Thread-safe: tests add and clear faults while requests are served."""

    streams_bodies = False  # every answer goes through answer(), where the faults are

    def __init__(self, upstream: str, *, seed: int = 0, **kwargs: Any) -> None:
        self._active = _Active()
        self._stopped = threading.Event()  # ends every stall, those that outlive clear() too
        self._rng = random.Random(seed)
        self.is_down = False
        super().__init__(upstream, **kwargs)

    # -- switching -----------------------------------------------------------------------------

    def add(self, fault: Fault) -> Fault:
        with self.state.lock:
            self._active.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Every fault off; stalled answers end now (their connections are closed)."""
        with self.state.lock:
            old = self._active
            self._active = _Active()
        old.release.set()

    @contextlib.contextmanager
    def fault(self, fault: Fault) -> Iterator[Fault]:
        self.add(fault)
        try:
            yield fault
        finally:
            self.clear()

    def down(self) -> None:
        """Connection refused from now on: the listener is closed and live connections are cut."""
        self.server.shutdown()
        self.server.server_close()
        self.is_down = True
        self._cut_live()

    def up(self) -> None:
        if self.is_down:
            self._start()  # same port: SO_REUSEADDR lets the new listener bind at once
            self.is_down = False

    def stop(self) -> None:
        self._stopped.set()
        self.clear()
        if not self.is_down:
            super().stop()
        self._cut_live()

    def _cut_live(self) -> None:
        with self.state.lock:
            live = list(self.live)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _pick(self, h: http.server.BaseHTTPRequestHandler, pre: bool) -> tuple[Fault | None, threading.Event]:
        req = Request(h.command, h.path, {k.lower(): v for k, v in h.headers.items()})
        with self.state.lock:
            active = self._active
            for fault in active.faults:
                if (fault.kind in PRE) != pre or (fault.times is not None and fault.times <= 0):
                    continue
                if not fault.match(req) or self._rng.random() >= fault.probability:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                fault.hits += 1
                return fault, self._stopped if fault.outlives_clear else active.release
        return None, active.release

    # -- serving -------------------------------------------------------------------------------

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        fault, release = self._pick(h, pre=True)
        if fault is None:
            super().handle(h)
            return
        with self.state.lock:
            self.state.seen.append((h.command, h.path, {k.lower(): v for k, v in h.headers.items()}))
        h.close_connection = True  # the request body (if any) was not read: never reuse this connection
        if fault.kind is Kind.STATUS:
            headers = dict(fault.headers)
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            self._reply(h, fault.status, headers, fault.body)
        elif fault.kind is Kind.STALL:
            self._stall(h, fault, release)
        elif fault.kind is Kind.REDIRECT_LOOP:
            self._reply(h, 307, {"Location": h.path}, b"")
        # Kind.CLOSE: nothing at all; the connection closes when the handler returns

    def answer(self, h: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        fault, release = self._pick(h, pre=False)
        if fault is None:
            super().answer(h, status, headers, body)
            return
        kind = fault.kind
        if kind is Kind.CONTENT_RANGE and "content-range" in {k.lower() for k in headers}:
            headers = {k: (_shift_range(v) if k.lower() == "content-range" else v) for k, v in headers.items()}
            super().answer(h, status, headers, body)
            return
        if kind is Kind.LONGER:
            super().answer(h, status, headers, body + b"\xee" * (len(body) // 2 + 1))
            return
        if kind is Kind.REPLACE:
            super().answer(h, status, {**headers, **fault.headers}, fault.body)
            return
        if kind is Kind.FLIP and body:
            # the middle of the body, or the byte at blob offset `at`: a chunked client asks for
            # whole chunks, whose middle may lie outside the file a test means to corrupt
            flipped = bytearray(body)
            pos = len(body) // 2
            rng = _content_range_start(headers)
            if fault.at is not None and rng is not None and 0 <= fault.at - rng < len(body):
                pos = fault.at - rng
            flipped[pos] ^= 0x10
            super().answer(h, status, headers, bytes(flipped))
            return
        h.close_connection = True
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command == "HEAD":
            return
        half = len(body) // 2
        with contextlib.suppress(OSError):
            if kind is Kind.RESET:
                h.wfile.write(body[:half])
                _reset(h)
            elif kind is Kind.TRUNCATE:
                h.wfile.write(body[:half])
            elif kind is Kind.STALL_BODY:
                h.wfile.write(body[:half])
                self._stall(h, fault, release)
            elif kind is Kind.DRIP:
                self._drip(h, body, fault.rate_bps, release)

    def _stall(self, h: http.server.BaseHTTPRequestHandler, fault: Fault, release: threading.Event) -> None:
        """Hold the answer until released, `stall_s` passed, or the client hung up (counted in
        ``fault.stalled`` meanwhile: a test sees which requests a client still waits on)."""
        with self.state.lock:
            fault.stalled += 1
        deadline = time.monotonic() + min(fault.stall_s, STALL_MAX_S)
        try:
            while not release.wait(0.02) and time.monotonic() < deadline:
                if _hung_up(h.connection):
                    return
        finally:
            with self.state.lock:
                fault.stalled -= 1

    def _drip(
        self, h: http.server.BaseHTTPRequestHandler, body: bytes, rate_bps: int, release: threading.Event
    ) -> None:
        block = max(1, min(DRIP_BLOCK_BYTES, rate_bps))
        deadline = time.monotonic() + STALL_MAX_S
        for pos in range(0, len(body), block):
            h.wfile.write(body[pos : pos + block])
            if release.wait(block / rate_bps) or time.monotonic() > deadline:
                return


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed the connection (readable, and nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _shift_range(value: str) -> str:
    unit, _, spec = value.partition(" ")
    rng, _, total = spec.partition("/")
    first, _, last = rng.partition("-")
    try:
        return f"{unit} {int(first) + 1}-{int(last) + 1}/{total}"
    except ValueError:
        return value + "x"


def _reset(h: http.server.BaseHTTPRequestHandler) -> None:
    """Abort the connection with a RST (SO_LINGER 0, then close the descriptor itself: closing
    the socket object would wait for the handler's file objects, and shutdown would send a FIN)."""
    sock = h.connection
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    fd = sock.detach()
    with contextlib.suppress(OSError):
        os.close(fd)
