"""The systemd notify protocol against a real AF_UNIX datagram socket: READY=1 only once the mount
answers stat, STATUS lines while loading, WATCHDOG=1 pings, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.helpers import FIXTURES
from tests.support.mounts import blobmount_cmd, is_mounted, require_fuse, unmount

pytestmark = pytest.mark.fuse
WAIT_S = 20.0


def test_notify_protocol(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(WAIT_S)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        blobmount_cmd("mount", "-f", f"dir:{FIXTURES / 'basic'}", str(mnt), "--cache-dir", str(tmp_path / "c")),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    messages: list[str] = []
    try:
        deadline = time.monotonic() + WAIT_S
        while not any("READY=1" in m for m in messages) and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        ready = next(m for m in messages if "READY=1" in m)
        assert "top.md" in os.listdir(mnt)  # live when READY arrived
        assert "STATUS=serving" in ready
        assert any(m.startswith("STATUS=opening") for m in messages[: messages.index(ready)])
        pings = 0
        while pings < 2 and time.monotonic() < deadline:
            pings += sock.recv(4096).decode().count("WATCHDOG=1")
        assert pings >= 2
        proc.send_signal(signal.SIGTERM)
        while time.monotonic() < deadline:
            msg = sock.recv(4096).decode()
            if "STOPPING=1" in msg:
                break
        else:
            pytest.fail("no STOPPING=1")
        assert proc.wait(WAIT_S) == 0
        assert not is_mounted(mnt)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        unmount(mnt)
