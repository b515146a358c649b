"""The opt-in ``--metrics`` HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``.

A minimal HTTP/1.1 responder on trio sockets (GET and HEAD, ``Connection: close``, one request per
connection); no framework for three fixed paths. ``/healthz`` is 200 only when the mount answers
``statvfs`` through the kernel (which always reaches the daemon, unlike ``stat``, which the kernel
may answer from its attribute cache) within control.HEALTH_TIMEOUT_S; ``/readyz`` is 200 once the
mount has been reported ready and until it starts stopping. Like the control socket it only reads
state: a slow or hostile client costs one connection task, bounded by control.CLIENT_TIMEOUT_S,
and at most :data:`MAX_HTTP_CLIENTS` of them at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket

import trio

from blobmount.daemon import metrics
from blobmount.daemon.control import CLIENT_TIMEOUT_S, DaemonState, read_until
from blobmount.errors import UsageError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192  # request line + headers; we need only the first line
MAX_HTTP_CLIENTS = 32  # scrapers and probes need a few; more at once is a flood, answered by a close


def parse_address(text: str) -> tuple[str | None, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (every interface) -> (host or None, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise UsageError(f"--metrics {text!r}: expected [HOST]:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--metrics {text!r}: bad port") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--metrics {text!r}: port out of range")
    host = host.strip("[]")
    return (host or None), port


def open_metrics_socket(address: str) -> socket.socket:
    """Bind the --metrics address (before the daemon forks, so a port in use is a one-line error
    in the foreground, not a dead daemon). `:PORT` listens on every interface, IPv6 too if present."""
    host, port = parse_address(address)
    try:
        if host is None:
            if socket.has_dualstack_ipv6():
                return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
            return socket.create_server(("", port))
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        return socket.create_server(addr[:2], family=family)
    except OSError as exc:
        raise UsageError(f"--metrics {address}: cannot listen: {exc.strerror or exc}") from exc


def metrics_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"


async def serve_metrics(state: DaemonState, sock: socket.socket) -> None:
    """Long-lived task: the --metrics HTTP endpoint on an already bound socket, until cancelled."""
    state.metrics_url = metrics_url(sock)
    log.info("metrics at %s", state.metrics_url)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    slots = trio.CapacityLimiter(MAX_HTTP_CLIENTS)
    await trio.serve_listeners(functools.partial(_http_client, state=state, slots=slots), [listener])


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


async def _http_client(stream: trio.SocketStream, state: DaemonState, slots: trio.CapacityLimiter) -> None:
    async with stream:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            await _http_exchange(stream, state)
        finally:
            slots.release()


async def _http_exchange(stream: trio.SocketStream, state: DaemonState) -> None:
    with trio.move_on_after(CLIENT_TIMEOUT_S):
        head = await read_until(stream, b"\r\n\r\n", MAX_REQUEST_BYTES)
        status, ctype, body, method = 400, "text/plain; charset=utf-8", b"bad request\n", "GET"
        if head is not None:
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            target = rest.partition(" ")[0].partition("?")[0]
            status, ctype, body = await _route(method, target, state)
        head_out = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(head_out + (b"" if method == "HEAD" else body))


async def _route(method: str, target: str, state: DaemonState) -> tuple[int, str, bytes]:
    text = "text/plain; charset=utf-8"
    if method not in ("GET", "HEAD"):
        return 405, text, b"only GET and HEAD\n"
    if target == "/metrics":
        return 200, "text/plain; version=0.0.4; charset=utf-8", metrics.render().encode()
    if target == "/healthz":
        return (200, text, b"ok\n") if await state.healthy() else (503, text, b"mount does not answer\n")
    if target == "/readyz":
        return (200, text, b"ready\n") if metrics.READY.value() == 1 else (503, text, b"not ready\n")
    return 404, text, b"not found: try /metrics, /healthz, /readyz\n"
