"""The mountpoint before a mount: refused when missing, live, not a directory or (without
``-o nonempty``) not empty; a stale one (its daemon died: ENOTCONN) unmounted lazily; libfuse's
``/dev/fd/N`` convention for a mount a privileged helper made. Checked in the parent process,
before anything is opened, so a bad mountpoint is one clear line and nothing else happens.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import subprocess
from pathlib import Path

from blobmount.errors import UsageError

log = logging.getLogger("blobmount.mount")  # the mount's own log lines (their logger name is shown)


def fuse_fd(path: Path) -> int | None:
    """libfuse's convention: a mountpoint `/dev/fd/N` means "already mounted, serve /dev/fuse fd N".
    A privileged helper opens /dev/fuse, mounts with fd=N and hands the fd to an unprivileged
    daemon (the non-root sidecar); the daemon never mounts or unmounts, the helper does."""
    match = re.fullmatch(r"/dev/fd/(\d+)", str(path))
    return int(match.group(1)) if match else None


def check_mountpoint(path: Path, nonempty: bool = False) -> None:
    """Refuse a missing or live mountpoint; lazily unmount a stale one (ENOTCONN after a crash);
    refuse a directory with entries unless `nonempty` (-o nonempty): mounting over it would hide
    them, silently (libfuse 3 no longer checks).

    A dead FUSE mount can still answer ``stat`` from attributes the kernel cached, so liveness is
    probed with ``statvfs``, which always reaches the daemon."""
    fd = fuse_fd(path)
    if fd is not None:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise UsageError(f"mountpoint {path}: fd {fd} is not open ({exc.strerror})") from exc
        if not stat.S_ISCHR(mode):
            raise UsageError(f"mountpoint {path}: fd {fd} is not an open /dev/fuse")
        return
    try:
        os.stat(path)
        stale = False
        if os.path.ismount(path):
            os.statvfs(path)
            raise UsageError(f"mountpoint {path}: something is already mounted there")
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            if exc.errno == errno.ENOENT:
                raise UsageError(f"mountpoint {path}: does not exist") from exc
            raise UsageError(f"mountpoint {path}: {exc.strerror}") from exc
        stale = True
    if stale:
        log.warning("%s: stale FUSE mount (its daemon died); unmounting it lazily", path)
        _lazy_unmount(path)
    if not os.path.isdir(path):
        raise UsageError(f"mountpoint {path}: not a directory")
    if not nonempty and _has_entries(path):
        raise UsageError(
            f"mountpoint {path}: not empty (a mount would hide its files); pass -o nonempty to mount over them"
        )
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse does not exist: load the fuse module or pass --device /dev/fuse to the container")


def _has_entries(path: Path) -> bool:
    """Whether the directory holds anything (one entry read, however large it is). A directory
    we may not list is left to the mount itself to judge."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is not None
    except OSError as exc:
        log.debug("mountpoint %s: cannot list it (%s); not checked for entries", path, exc.strerror)
        return False


def _lazy_unmount(path: Path) -> None:
    result = subprocess.run(
        ["fusermount3", "-u", "-z", str(path)], capture_output=True, text=True, check=False, timeout=30
    )
    if result.returncode != 0:
        raise UsageError(f"mountpoint {path}: stale mount could not be unmounted: {result.stderr.strip()}")
