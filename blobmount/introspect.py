"""What the running daemon tells the outside: the control socket behind `blobmount status MNT`, and
the opt-in ``--metrics`` HTTP endpoint (``/metrics``, ``/healthz``, ``/readyz``).

Both are long-lived trio tasks that mount.py starts in its root nursery; both only read state
(metrics.py's values, :class:`DaemonState`) and never touch the filesystem's data path, so a slow or
hostile client costs one connection task, bounded by :data:`CLIENT_TIMEOUT_S`, and nothing else.

Control socket: an AF_UNIX stream socket in the daemon's runtime directory (``$RUNTIME_DIRECTORY``
under systemd, else ``/run/blobmount`` as root, else ``$XDG_RUNTIME_DIR/blobmount``), named after a
hash of the mountpoint's real path, so `status MNT` finds it from the mountpoint alone. Protocol:
one JSON line in (``{"cmd": "status"}``), one JSON line out. The directory is 0700 and the socket
0600: only the daemon's user asks.

HTTP: a minimal HTTP/1.1 responder on trio sockets (GET and HEAD, ``Connection: close``, one request
per connection); no framework for three fixed paths. ``/healthz`` is 200 only when the mount
answers ``statvfs`` through the kernel (which always reaches the daemon, unlike ``stat``, which the
kernel may answer from its attribute cache) within :data:`HEALTH_TIMEOUT_S`; ``/readyz`` is 200 once
the mount has been reported ready and until it starts stopping.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from blobmount import __version__, metrics
from blobmount.errors import EXIT_OK, NotFound, SourceError, UsageError

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_S = 5.0  # one request's whole exchange; a scraper or `status` needs milliseconds
HEALTH_TIMEOUT_S = 5.0  # a mount that cannot answer statvfs in 5 s is not healthy
MAX_REQUEST_BYTES = 8192  # request line + headers; we need only the first line
MAX_CONTROL_LINE_BYTES = 4096
MAX_HTTP_CLIENTS = 32  # scrapers and probes need a few; more at once is a flood, answered by a close


# -- where the control socket lives ---------------------------------------------------------------


def runtime_dir() -> Path:
    """The daemon's runtime directory, as systemd or the session provides it."""
    given = os.environ.get("RUNTIME_DIRECTORY")
    if given:
        return Path(given.split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/blobmount")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "blobmount"
    return Path(f"/tmp/blobmount-{os.geteuid()}")


def socket_name(mountpoint: Path | str) -> str:
    """`mnt-<16 hex>.sock` from the real path: unique per mountpoint, short enough for sun_path.

    Only the parent directory is resolved: the mountpoint itself belongs to the FUSE daemon, and
    resolving it from the daemon's own event loop (or against a hung daemon) would never return."""
    path = os.path.abspath(mountpoint)
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    return f"mnt-{hashlib.sha256(os.fsencode(real)).hexdigest()[:16]}.sock"


def candidate_sockets(mountpoint: Path | str) -> list[Path]:
    """Where a daemon for `mountpoint` may listen, seen from a client whose environment differs
    (a shell asking about a systemd unit's mount: ``/run/blobmount-NAME/``)."""
    name = socket_name(mountpoint)
    found = [runtime_dir() / name, Path("/run/blobmount") / name]
    found += [Path(p) for p in sorted(glob.glob(f"/run/blobmount*/{name}"))]
    if os.environ.get("XDG_RUNTIME_DIR"):
        found.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "blobmount" / name)
    found.append(Path(f"/tmp/blobmount-{os.geteuid()}") / name)
    return list(dict.fromkeys(found))


# -- the daemon's side ----------------------------------------------------------------------------


@dataclass(slots=True)
class DaemonState:
    """What `status` reports besides the metrics: fixed at mount time (mount.py fills it)."""

    mountpoint: Path
    source: str  # as the user gave it (a tag stays a tag)
    pinned: str  # the archive's name: for a registry, registry/repo@manifest-digest
    index_digest: str
    data_digest: str | None
    entries: int
    data_size: int
    cache_dir: Path
    cache_limit: int
    started: float = field(default_factory=time.time)
    metrics_url: str | None = None
    socket_path: Path | None = None
    profile: Callable[[], dict[str, Any]] | None = None  # --record-profile: the profile so far

    def status(self) -> dict[str, Any]:
        hits = metrics.CACHE_HITS.total()
        misses = metrics.CACHE_MISSES.total()
        fetch_requests = metrics.FETCH_REQUESTS.total()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "mountpoint": str(self.mountpoint),
            "source": self.source,
            "pinned": self.pinned,
            "index_digest": self.index_digest,
            "data_digest": self.data_digest,
            "entries": self.entries,
            "data_size_bytes": self.data_size,
            "uptime_s": round(time.time() - self.started, 3),
            "ready": metrics.READY.value() == 1,
            "cache": {
                "dir": str(self.cache_dir),
                "limit_bytes": self.cache_limit,
                "used_bytes": int(metrics.CACHE_BYTES.total()),
                "hits": int(hits),
                "misses": int(misses),
                "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
                "evictions": int(metrics.CACHE_EVICTIONS.total()),
            },
            "fetched": {
                "http_requests": int(metrics.HTTP_REQUESTS.total()),
                "http_bytes": int(metrics.HTTP_BYTES.total()),
                "retries": int(metrics.HTTP_RETRIES.total()),
                "fetch_bytes": int(metrics.FETCH_BYTES.total()),
                "fetch_requests": int(fetch_requests),
                "coalescing_ratio": round(metrics.FETCH_CHUNKS.total() / fetch_requests, 3) if fetch_requests else None,
            },
            "served": {
                "fuse_requests": int(metrics.FUSE_REQUESTS.total()),
                "fuse_errors": int(metrics.FUSE_ERRORS.total()),
                "read_bytes": int(metrics.FUSE_READ_BYTES.total()),
            },
            "metrics_url": self.metrics_url,
            "socket": str(self.socket_path) if self.socket_path else None,
        }

    async def healthy(self) -> bool:
        """The mount answers statvfs through the kernel, in time."""
        with trio.move_on_after(HEALTH_TIMEOUT_S):
            try:
                await trio.to_thread.run_sync(os.statvfs, self.mountpoint, abandon_on_cancel=True)
            except OSError as exc:
                log.debug("health: statvfs %s: %s", self.mountpoint, exc)
                return False
            return True
        log.warning("health: %s did not answer statvfs within %.0f s", self.mountpoint, HEALTH_TIMEOUT_S)
        return False


@contextlib.contextmanager
def _dir_locked(directory: Path) -> Iterator[None]:
    """Serialise binding and removing control sockets in `directory` among the daemons sharing it.

    A daemon lazily unmounted (``fusermount3 -uz``) lives on while files are open; a new daemon
    mounted at the same place takes the socket name over. Without the lock the old one, exiting,
    could check that the name is still its own, lose the processor, and remove its successor's
    socket. The lock is held for a bind or an unlink only: microseconds."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _bind_unix(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """The listening socket at `path` and the (device, inode) of its file: the daemon removes the
    name on exit only while it is still this file (:func:`_unlink_own`)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.parent.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        # e.g. a /tmp/blobmount-UID another user created first: they could swap our socket
        raise OSError(errno.EPERM, f"{path.parent} is not a private directory of ours")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _dir_locked(path.parent):
            if path.exists() or path.is_symlink():
                # mount.py refused a live mount at this mountpoint: a socket here belongs to a dead
                # daemon, or to one lazily unmounted that still serves its open files (the name
                # is ours now: `status MNT` asks whoever serves MNT)
                path.unlink()
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
            own = path.lstat()
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock, (own.st_dev, own.st_ino)


def _unlink_own(path: Path, own: tuple[int, int]) -> None:
    """Remove the socket name if it is still the file this daemon bound, never a successor's."""
    with contextlib.suppress(OSError), _dir_locked(path.parent):
        st = path.lstat()
        if (st.st_dev, st.st_ino) == own:
            path.unlink()
        else:
            log.debug("control socket %s belongs to another daemon now; left in place", path)


async def serve_control(state: DaemonState, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
    """Long-lived task: answer `blobmount status` on the control socket until cancelled."""
    path = runtime_dir() / socket_name(state.mountpoint)
    try:
        raw, own = _bind_unix(path)
    except OSError as exc:  # no runtime dir we may write: status is unavailable, the mount is not
        log.warning("control socket %s: %s; `blobmount status` will not find this daemon", path, exc)
        task_status.started(path)
        return
    state.socket_path = path
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    log.debug("control socket at %s", path)
    try:
        task_status.started(path)
        await trio.serve_listeners(functools.partial(_control_client, state=state), [listener])
    finally:
        _unlink_own(path, own)


async def _control_client(stream: trio.SocketStream, state: DaemonState) -> None:
    async with stream:
        with trio.move_on_after(CLIENT_TIMEOUT_S):
            line = await _read_until(stream, b"\n", MAX_CONTROL_LINE_BYTES)
            try:
                request = json.loads(line or b"{}")
                cmd = request.get("cmd") if isinstance(request, dict) else None
            except ValueError:
                cmd = None
            if cmd == "status":
                answer: dict[str, Any] = {"ok": True, "status": state.status()}
            elif cmd == "ping":
                answer = {"ok": True}
            elif cmd == "profile" and state.profile is not None:
                answer = {"ok": True, "profile": state.profile()}
            elif cmd == "profile":
                why = "this mount records no prefetch profile (mount it with --record-profile)"
                answer = {"ok": False, "error": why}
            else:
                answer = {"ok": False, "error": "unknown command (expected status, profile or ping)"}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(answer).encode() + b"\n")


async def _read_until(stream: trio.SocketStream, end: bytes, limit: int) -> bytes | None:
    """Bytes up to `end` (excluded); None when the peer closes early or sends more than `limit`."""
    buf = bytearray()
    while end not in buf:
        if len(buf) > limit:
            return None
        try:
            chunk = await stream.receive_some(4096)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf[: buf.index(end)])


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
        head = await _read_until(stream, b"\r\n\r\n", MAX_REQUEST_BYTES)
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


# -- the client: `blobmount status MNT` ----------------------------------------------------------


def ask(path: Path, cmd: str = "status", timeout_s: float = CLIENT_TIMEOUT_S, limit: int = 1 << 20) -> dict[str, Any]:
    """One request to a control socket (blocking; the CLI has no event loop to share); at most
    `limit` bytes of answer (a `profile` answer is larger than a status)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n") and len(buf) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    answer = json.loads(buf)
    if not isinstance(answer, dict) or not answer.get("ok"):
        raise SourceError(f"{path}: the daemon refused: {answer.get('error') if isinstance(answer, dict) else answer}")
    return answer


def find_daemon(mountpoint: str, socket_path: Path | None = None) -> tuple[Path, dict[str, Any]]:
    tried = [socket_path] if socket_path else candidate_sockets(mountpoint)
    for path in tried:
        try:
            return path, ask(path)["status"]
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOENT):
                continue  # a dead daemon's socket
            raise SourceError(f"{path}: {exc.strerror or exc}") from exc
    raise NotFound(f"no blobmount daemon answers for {mountpoint} (looked in: {', '.join(map(str, tried))})")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def summary(st: dict[str, Any]) -> str:
    """The human form of a status answer: one fact per line."""
    cache, fetched, served = st["cache"], st["fetched"], st["served"]
    rate = f"{cache['hit_rate'] * 100:.1f}%" if cache["hit_rate"] is not None else "-"
    ratio = f", {fetched['coalescing_ratio']} chunks/request" if fetched["coalescing_ratio"] else ""
    lines = [
        (
            "mountpoint",
            f"{st['mountpoint']} ({'ready' if st['ready'] else 'NOT ready'}, pid {st['pid']}, "
            f"up {_duration(st['uptime_s'])}, blobmount {st['version']})",
        ),
        ("source", st["source"]),
        ("pinned", st["pinned"]),
        ("index", st["index_digest"]),
        ("data", f"{st['data_digest'] or '-'} ({_size(st['data_size_bytes'])}, {st['entries']} entries)"),
        ("cache", f"{_size(cache['used_bytes'])} of {_size(cache['limit_bytes'])} in {cache['dir']}"),
        ("hit rate", f"{rate} ({cache['hits']} hits, {cache['misses']} misses, {cache['evictions']} evictions)"),
        (
            "fetched",
            f"{_size(fetched['http_bytes'])} in {fetched['http_requests']} HTTP requests "
            f"({fetched['retries']} retries{ratio})",
        ),
        (
            "served",
            f"{_size(served['read_bytes'])} read, {served['fuse_requests']} FUSE requests "
            f"({served['fuse_errors']} errors)",
        ),
        ("metrics", st["metrics_url"] or "off (--metrics ADDR)"),
    ]
    return "\n".join(f"{key:11}{value}" for key, value in lines)


def status_command(mountpoint: str, *, json_out: bool = False, socket_path: Path | None = None) -> int:
    _, st = find_daemon(mountpoint, socket_path)
    if json_out:
        print(json.dumps(st, indent=2))
    else:
        print(summary(st))
    sys.stdout.flush()
    return EXIT_OK
