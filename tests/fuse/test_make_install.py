"""`make install` into temporary directories (PREFIX, SBINDIR, UNITDIR), then the installed tree is
used on its own: `blobmount --version`, the installed unit's ExecStart, and a real mount through the
installed mount(8) helper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.helpers import FIXTURES, tree_files
from tests.support.mounts import daemon_pids, is_mounted, require_fuse, unmount

pytestmark = [pytest.mark.fuse, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_make_install_into_temp_dirs(tmp_path: Path) -> None:
    require_fuse()
    prefix, sbin, units = tmp_path / "usr-local", tmp_path / "sbin", tmp_path / "systemd"
    dirs = [f"PREFIX={prefix}", f"SBINDIR={sbin}", f"UNITDIR={units}", f"PY={sys.executable}"]
    out = subprocess.run(
        ["make", "-C", str(ROOT), "install", *dirs],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    blobmount = prefix / "bin" / "blobmount"
    version = subprocess.run([str(blobmount), "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("blobmount ")
    assert os.path.realpath(blobmount).startswith(str(prefix / "lib" / "blobmount" / "venv"))
    unit = (units / "blobmount@.service").read_text()
    assert f"ExecStart={blobmount} mount --foreground" in unit
    assert (units / "blobmount@.service").stat().st_mode & 0o777 == 0o644
    assert (prefix / "share" / "doc" / "blobmount" / "mnt-assets.mount.example").exists()

    helper = sbin / "mount.fuse.blobmount"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # nothing of the test's venv
    try:
        out = subprocess.run(
            [str(helper), f"dir:{FIXTURES / 'basic'}", str(mnt), "-o", f"cache_dir={tmp_path / 'c'},_netdev"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        assert is_mounted(mnt)
        assert (mnt / "top.md").read_bytes() == tree_files("basic")[b"top.md"].data
    finally:
        unmount(mnt)
    assert not is_mounted(mnt)
    assert wait_gone(mnt) == []  # the helper's daemon ended with its mount


def wait_gone(mnt: Path, timeout_s: float = 15.0) -> list[int]:
    """PIDs of daemons for `mnt` still alive after `timeout_s` (killed, by PID, before returning)."""
    deadline = time.monotonic() + timeout_s
    while (pids := daemon_pids(mnt)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids
