"""The daemon's life: background start reports success only once mounted, clean exits on signals
and external unmounts, one-line errors that leave nothing mounted, recovery from a stale mount."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.helpers import FIXTURES
from tests.support.mounts import blobmount_cmd, daemon_pids, is_mounted, mounted, require_fuse, unmount

pytestmark = pytest.mark.fuse

BASIC = f"dir:{FIXTURES / 'basic'}"
WAIT_S = 20.0


def _wait_exit(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(WAIT_S)
        pytest.fail("daemon did not exit")


def test_background_mode_returns_once_mounted_and_exits_on_fusermount(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        out = subprocess.run(
            blobmount_cmd(BASIC, str(mnt), "--cache-dir", str(tmp_path / "c")), capture_output=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert "top.md" in os.listdir(mnt)  # live the moment the command returned
        pids = daemon_pids(mnt)
        assert len(pids) == 1
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        deadline = time.monotonic() + WAIT_S
        while Path(f"/proc/{pids[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pids[0]}").exists() or b"Z" in Path(f"/proc/{pids[0]}/stat").read_bytes().split()[2]
    finally:
        unmount(mnt)
        for pid in daemon_pids(mnt):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_exits_zero(sig: signal.Signals, tmp_path: Path) -> None:
    with mounted(BASIC, tmp_path / "mnt") as m:
        m.proc.send_signal(sig)
        assert _wait_exit(m.proc) == 0
        assert not is_mounted(m.path)


def test_sigterm_with_open_files_unmounts_lazily_and_exits_zero(tmp_path: Path) -> None:
    with mounted(BASIC, tmp_path / "mnt") as m:
        held = open(m.path / "top.md", "rb")
        try:
            m.proc.send_signal(signal.SIGTERM)
            assert _wait_exit(m.proc) == 0
            assert not is_mounted(m.path)
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: the daemon is gone, as it should be
                held.close()


def test_fusermount_ends_a_foreground_daemon_with_zero(tmp_path: Path) -> None:
    with mounted(BASIC, tmp_path / "mnt") as m:
        subprocess.run(["fusermount3", "-u", str(m.path)], check=True, timeout=30)
        assert _wait_exit(m.proc) == 0


def _fails(tmp_path: Path, source: str, mnt: Path, code: int | None = None, live: bool = False) -> str:
    out = subprocess.run(
        blobmount_cmd(source, str(mnt), "--cache-dir", str(tmp_path / "c")), capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    if code is not None:
        assert out.returncode == code
    assert out.stderr.startswith("blobmount: ")
    assert out.stderr.count("\n") == 1, out.stderr
    if mnt.exists() and not live:
        assert not is_mounted(mnt)
    return out.stderr


def test_one_line_errors_leave_nothing_mounted(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    assert "does not exist" in _fails(tmp_path, BASIC, mnt, 2)
    mnt.mkdir()
    assert "not a directory holding index.blob" in _fails(tmp_path, f"dir:{tmp_path / 'nowhere'}", mnt)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.blob").write_bytes(os.urandom(100))
    (bad / "data.blob").write_bytes(b"")
    assert "index" in _fails(tmp_path, f"dir:{bad}", mnt, 4)
    with mounted(BASIC, mnt):
        assert "already mounted" in _fails(tmp_path, BASIC, mnt, 2, live=True)


@pytest.mark.parametrize("allow", [("-o", "nonempty"), ("--nonempty",), ("env",)])
def test_a_mountpoint_with_entries_is_refused_unless_nonempty(allow: tuple[str, ...], tmp_path: Path) -> None:
    """Mounting over a directory's entries hides them; libfuse 3 does it without a word, so the
    mount refuses with one line (exit 2) unless asked: -o nonempty, --nonempty or BLOBMOUNT_NONEMPTY."""
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "mine.txt").write_text("was here first\n")
    try:
        err = _fails(tmp_path, BASIC, mnt, 2)
    finally:
        unmount(mnt)  # a mount that should not have happened (backgrounded: it would linger)
    assert f"mountpoint {mnt}: not empty" in err
    assert "-o nonempty" in err
    assert os.listdir(mnt) == ["mine.txt"]
    env = {"BLOBMOUNT_NONEMPTY": "1"} if allow == ("env",) else {}
    args = () if allow == ("env",) else allow
    with mounted(BASIC, mnt, *args, env={**os.environ, **env}) as m:
        assert "top.md" in os.listdir(m.path)
        assert "mine.txt" not in os.listdir(m.path)  # hidden while mounted, as asked
    assert os.listdir(mnt) == ["mine.txt"]


def test_stale_mount_is_recovered(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(BASIC, mnt) as m:
        m.proc.kill()
        m.proc.wait(WAIT_S)
        with pytest.raises(OSError):
            os.statvfs(mnt)  # ENOTCONN: the daemon is gone, the mount is not
        proc = subprocess.Popen(
            [*blobmount_cmd("mount", "-f", BASIC, str(mnt), "--cache-dir", str(tmp_path / "c2"))],
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                try:
                    if "top.md" in os.listdir(mnt):
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            assert "top.md" in os.listdir(mnt)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=WAIT_S)
        assert b"stale" in err
        assert proc.returncode == 0
