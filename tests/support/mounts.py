"""Real FUSE mounts for tests: a daemon per mount, started in the foreground so the test owns its
PID, always unmounted and stopped, even when the test fails. Missing FUSE fails loudly (never skips):
a green run that mounted nothing would be a lie."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import Registry

MOUNT_WAIT_S = 30.0  # hang guard: a mount is normally ready in well under a second
STOP_WAIT_S = 15.0
READY_POLL_S = 0.1  # how often the wait for READY=1 looks at the daemon


def require_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: FUSE tests cannot run (they must not be skipped)")
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is missing: install the fuse3 package (make test does)")


def blobmount_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "blobmount.cli", *args]


class Mount:
    """A running foreground daemon and its mountpoint."""

    def __init__(self, proc: subprocess.Popen[bytes], path: Path, log_path: Path) -> None:
        self.proc = proc
        self.path = path
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        target = os.path.realpath(path)
        return any(line.split()[4] == target for line in f)


def unmount(path: Path) -> None:
    """Unmount `path` if mounted (lazily if busy). Bounded."""
    for _ in range(3):
        if not is_mounted(path):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=30, check=False)
        time.sleep(0.05)


def _wait_ready(mount: Mount, ready: socket.socket, notified: bool) -> None:
    """Until the daemon itself says READY=1 (systemd's protocol, on a socket of our own), not merely
    until the mount shows in mountinfo: the daemon stats its own mountpoint before READY, and an
    unmount racing with that stat fails with EBUSY. The socket is closed right after, so later
    STATUS lines go nowhere instead of filling a queue nobody reads."""
    deadline = time.monotonic() + MOUNT_WAIT_S
    while True:
        if mount.proc.poll() is not None:
            pytest.fail(f"daemon exited {mount.proc.returncode} before mounting:\n{mount.log()}")
        if time.monotonic() > deadline:
            pytest.fail(f"mount not ready after {MOUNT_WAIT_S} s:\n{mount.log()}")
        if not notified:  # the caller brought its own NOTIFY_SOCKET: mountinfo is all we have
            if is_mounted(mount.path):
                return
            time.sleep(0.02)
            continue
        try:
            message = ready.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in message.split(b"\n"):
            assert is_mounted(mount.path), "READY=1 before the mount showed in mountinfo"
            return


_serial = itertools.count()


@contextlib.contextmanager
def mounted(
    source: str, mnt: Path, *args: str, cache_dir: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[Mount]:
    """`env` replaces the daemon's environment (tests/support/resolver.py injects a resolver through it)."""
    require_fuse()
    mnt.mkdir(parents=True, exist_ok=True)
    cache = cache_dir or mnt.parent / f"{mnt.name}-cache"
    log_path = mnt.parent / f"{mnt.name}.log"
    cmd = blobmount_cmd("mount", "-f", source, str(mnt), "--cache-dir", str(cache), *args)
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    name = f"@blobmount-test-{os.getpid()}-{next(_serial)}"
    ready.bind("\0" + name[1:])
    ready.settimeout(READY_POLL_S)
    env = dict(os.environ if env is None else env)
    env.setdefault("NOTIFY_SOCKET", name)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    mount = Mount(proc, mnt, log_path)
    try:
        with ready:
            _wait_ready(mount, ready, env["NOTIFY_SOCKET"] == name)
        os.stat(mnt)
        yield mount
    finally:
        unmount(mnt)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_WAIT_S)
        unmount(mnt)


def daemon_pids(mnt: Path) -> list[int]:
    pids = []
    needle = os.fsencode(str(mnt))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"blobmount" in cmdline and needle in cmdline.split(b"\0"):
            pids.append(int(entry))
    return pids


def push_dir(registry: Registry, archive: Path, repo: str) -> str:
    import trio

    from blobmount.reference import Reference
    from blobmount.registry.client import RegistryOptions
    from blobmount.registry.push import push_archive

    ref = Reference.parse(f"{registry.host}/{repo}:v1")
    trio.run(push_archive, archive, ref, RegistryOptions())
    return str(ref)
