"""The non-root variant: a privileged helper (here, the test as root) opens /dev/fuse and mounts
with fd=N; blobmount runs without any capability with `/dev/fd/N` as its mountpoint (libfuse's
convention, supported by libfuse 3.14 + pyfuse3), serves the mount, and exits 0 when the helper
unmounts."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.helpers import FIXTURES, tree_files
from tests.support.mounts import is_mounted, require_fuse, unmount

pytestmark = pytest.mark.fuse
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
WAIT_S = 30.0


def test_unprivileged_daemon_serves_a_mount_made_by_a_privileged_helper(tmp_path: Path) -> None:
    require_fuse()
    assert os.geteuid() == 0, "this test plays the privileged helper: it runs as root (CI does)"
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is missing"
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fd = os.open("/dev/fuse", os.O_RDWR)
    fd_open = True
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions".encode()
    if libc.mount(b"blobmount", os.fsencode(mnt), b"fuse.blobmount", MS_RDONLY | MS_NOSUID | MS_NODEV, opts) != 0:
        os.close(fd)
        pytest.fail(f"mount(2) with fd={fd} failed: {os.strerror(ctypes.get_errno())}")
    log_path = tmp_path / "daemon.log"
    proc = None
    # The daemon gets no capability at all and cannot regain one (no_new_privs: setuid fusermount3
    # is powerless too). Its interpreter lives under /root here, so it keeps uid 0 to exec it;
    # in an image, USER 65534 is the same story.
    drop = [setpriv, "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]
    daemon = [sys.executable, "-m", "blobmount.cli", "mount", "-f", f"dir:{FIXTURES / 'basic'}", f"/dev/fd/{fd}"]
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*drop, *daemon, "--cache-dir", str(tmp_path / "cache")],
                pass_fds=(fd,),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        os.close(fd)  # only the daemon holds it now: if it dies, the mount fails (ENOTCONN), never hangs
        fd_open = False
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                if (mnt / "top.md").read_bytes() == tree_files("basic")[b"top.md"].data:
                    break
            except OSError:
                pass
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert "CapEff:\t0000000000000000" in status
        assert "CapBnd:\t0000000000000000" in status
        assert "NoNewPrivs:\t1" in status
        assert libc.umount2(os.fsencode(mnt), 0) == 0, os.strerror(ctypes.get_errno())
        assert proc.wait(WAIT_S) == 0, log_path.read_text()
        assert not is_mounted(mnt)
    finally:
        if fd_open:
            os.close(fd)
        if is_mounted(mnt):
            libc.umount2(os.fsencode(mnt), MNT_DETACH)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        unmount(mnt)
