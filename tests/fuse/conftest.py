"""Real FUSE mounts for tests: a daemon per mount, started in the foreground so the test owns its
PID, always unmounted and stopped, even when the test fails. Missing FUSE fails loudly (never skips):
a green run that mounted nothing would be a lie."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MOUNT_WAIT_S = 30.0  # hang guard: a mount is normally ready in well under a second
STOP_WAIT_S = 15.0


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


def _is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        target = os.path.realpath(path)
        return any(line.split()[4] == target for line in f)


def unmount(path: Path) -> None:
    """Unmount `path` if mounted (lazily if busy). Bounded."""
    for _ in range(3):
        if not _is_mounted(path):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=30, check=False)
        time.sleep(0.05)


@contextlib.contextmanager
def mounted(
    source: str, mnt: Path, *args: str, cache_dir: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[Mount]:
    """`env` replaces the daemon's environment (tests/resolver.py injects a resolver through it)."""
    require_fuse()
    mnt.mkdir(parents=True, exist_ok=True)
    cache = cache_dir or mnt.parent / f"{mnt.name}-cache"
    log_path = mnt.parent / f"{mnt.name}.log"
    cmd = blobmount_cmd("mount", "-f", source, str(mnt), "--cache-dir", str(cache), *args)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    mount = Mount(proc, mnt, log_path)
    try:
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not _is_mounted(mnt):
            if proc.poll() is not None:
                pytest.fail(f"daemon exited {proc.returncode} before mounting:\n{mount.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"mount not ready after {MOUNT_WAIT_S} s:\n{mount.log()}")
            time.sleep(0.02)
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


HELPER = Path("/sbin/mount.fuse.blobmount")


@pytest.fixture
def helper_installed() -> Iterator[None]:
    """The helper where mount(8) looks for it: `make install` puts it there; else link it for the test."""
    require_fuse()
    ours = Path(sys.executable).parent / "mount.fuse.blobmount"
    assert ours.exists(), "the mount.fuse.blobmount console script is not installed (pip install -e .)"
    created = False
    if not HELPER.exists():
        HELPER.symlink_to(ours)
        created = True
    try:
        yield
    finally:
        if created:
            HELPER.unlink()
