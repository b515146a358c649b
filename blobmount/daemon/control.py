"""The daemon's control socket behind `blobmount status MNT`, and the state it reports.

A long-lived trio task that mount.py starts in its root nursery; it only reads state (the metrics'
values, :class:`DaemonState`) and never touches the filesystem's data path, so a slow or hostile
client costs one connection task, bounded by :data:`CLIENT_TIMEOUT_S`, and nothing else.

The socket: AF_UNIX stream in the daemon's runtime directory (``$RUNTIME_DIRECTORY`` under systemd,
else ``/run/blobmount`` as root, else ``$XDG_RUNTIME_DIR/blobmount``), named after a hash of the
mountpoint's real path, so `status MNT` finds it from the mountpoint alone. Protocol: one JSON line
in (``{"cmd": "status"}``), one JSON line out. The directory is 0700 and the socket 0600: only the
daemon's user asks. The client half (:func:`ask`, :func:`find_daemon`) lives here too, beside the
protocol it speaks; status.py prints what it returns, http.py serves the same state over HTTP.
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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from blobmount import __version__
from blobmount.daemon import metrics
from blobmount.errors import NotFound, SourceError

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_S = 5.0  # one request's whole exchange; a scraper or `status` needs milliseconds
HEALTH_TIMEOUT_S = 5.0  # a mount that cannot answer statvfs in 5 s is not healthy
MAX_CONTROL_LINE_BYTES = 4096


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
    """What `status` reports besides the metrics: fixed at mount time (mount.py fills it),
    except under --follow, where a switch updates what is served (follow.publish)."""

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
    follow: dict[str, Any] | None = None  # --follow: follow.py keeps it current (None: pinned)

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
            "follow": dict(self.follow) if self.follow is not None else None,
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
            line = await read_until(stream, b"\n", MAX_CONTROL_LINE_BYTES)
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


async def read_until(stream: trio.SocketStream, end: bytes, limit: int) -> bytes | None:
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
