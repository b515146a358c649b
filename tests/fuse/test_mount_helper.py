"""mount(8) integration: `mount -t fuse.blobmount SOURCE MNT -o ...`, and an fstab line used through
`mount MNT`: with util-linux's --fstab pointing at a test file, and with /etc/fstab itself inside a
private mount namespace (the host's /etc/fstab is never touched)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.helpers import FIXTURES, tree_files
from tests.support.mounts import daemon_pids, is_mounted, unmount

pytestmark = pytest.mark.fuse


def test_mount_t_fuse_blobmount(helper_installed: None, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = f"cache_dir={tmp_path / 'c'},cache_size=1G,allow_other,_netdev,nofail,x-systemd.automount"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    try:
        out = subprocess.run(
            ["mount", "-t", "fuse.blobmount", f"dir:{FIXTURES / 'basic'}", str(mnt), "-o", opts],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        assert is_mounted(mnt)
        assert (mnt / "top.md").read_bytes() == tree_files("basic")[b"top.md"].data
        assert "top.md" in os.listdir(mnt)
    finally:
        unmount(mnt)


def test_fstab_line_through_mount_mnt(helper_installed: None, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    source = f"dir:{FIXTURES / 'unicode'}"
    fstab.write_text(f"{source} {mnt} fuse.blobmount noauto,_netdev,nofail,cache_dir={tmp_path / 'c'} 0 0\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    try:
        out = subprocess.run(["mount", "-T", str(fstab), str(mnt)], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert is_mounted(mnt)
        assert "a b" in os.listdir(mnt)
        line = next(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if ln.split()[4] == str(mnt))
        assert "fuse.blobmount" in line
    finally:
        unmount(mnt)


def test_fstab_line_through_plain_mount_mnt(helper_installed: None, tmp_path: Path) -> None:
    """`mount MNT` reading /etc/fstab itself: inside a private mount namespace (unshare), a test
    fstab is bind-mounted over /etc/fstab, so the host's file is never touched; the namespace, its
    mount and its daemon end when the shell unmounts."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"# test fstab\ndir:{FIXTURES / 'basic'}  {mnt}  fuse.blobmount  "
        f"noauto,_netdev,nofail,x-systemd.automount,cache_dir={tmp_path / 'c'}  0 0\n"
    )
    assert Path("/etc/fstab").exists(), "bind-mounting over /etc/fstab needs the file to exist"
    script = f"""set -e
mount --bind {fstab} /etc/fstab
mount {mnt}
findmnt -n -o FSTYPE {mnt}
cat {mnt}/top.md
umount {mnt}
"""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        timeout=60,
        env=env,
    )
    try:
        assert out.returncode == 0, out.stderr.decode()
        fstype, _, content = out.stdout.partition(b"\n")
        assert fstype == b"fuse.blobmount"
        assert content == tree_files("basic")[b"top.md"].data
        assert Path("/etc/fstab").read_text() != fstab.read_text()  # the host's fstab was never replaced
    finally:
        deadline = time.monotonic() + 15
        while (pids := daemon_pids(mnt)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    assert pids == [], "the daemon outlived its unmount"
    assert not is_mounted(mnt)
