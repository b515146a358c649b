"""The shipped unit's own command lines, run as systemd would run them (no systemd in CI): ExecStart
with the unit's environment file, CACHE_DIRECTORY/RUNTIME_DIRECTORY and NOTIFY_SOCKET; READY=1
arrives once the mount answers; ExecStop unmounts cleanly and the daemon exits 0 by itself."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.helpers import FIXTURES, tree_files
from tests.support.mounts import is_mounted, require_fuse, unmount

pytestmark = pytest.mark.fuse
ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0


def unit() -> configparser.SectionProxy:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((ROOT / "systemd" / "blobmount@.service").read_text())
    return cp["Service"]


def expand(line: str, env: dict[str, str]) -> list[str]:
    """systemd's rules: a word that is exactly `$NAME` splits the value into words, `${NAME}`
    inside a word substitutes it as is."""
    words: list[str] = []
    for word in shlex.split(line):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def test_execstart_then_execstop_unmounts_cleanly(tmp_path: Path) -> None:
    require_fuse()
    service = unit()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env_file = tmp_path / "assets.env"  # what /etc/blobmount/assets.env would hold
    env_file.write_text(
        f"BLOBMOUNT_SOURCE=dir:{FIXTURES / 'basic'}\nBLOBMOUNT_MOUNTPOINT={mnt}\nBLOBMOUNT_ARGS=--cache-size 1G -o ro\n"
    )
    assert service["EnvironmentFile"] == "/etc/blobmount/%i.env"
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    env |= dict(item.split("=", 1) for item in service["Environment"].split())
    env |= {
        "PATH": os.environ["PATH"],
        "CACHE_DIRECTORY": str(tmp_path / "cache"),
        "RUNTIME_DIRECTORY": str(tmp_path / "run"),
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
    }
    start = expand(service["ExecStart"], env)
    assert start[0] == "/usr/local/bin/blobmount"
    start[0] = str(Path(sys.executable).parent / "blobmount")  # the venv's, where make install links it
    stop = expand(service["ExecStop"], env)
    assert Path(stop[0]).exists(), f"{stop[0]}: ExecStop's binary is not where the unit says"

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(env["NOTIFY_SOCKET"])
    sock.settimeout(WAIT_S)
    with open(tmp_path / "daemon.log", "wb") as log:
        proc = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if "READY=1" in sock.recv(4096).decode():
                break
        assert is_mounted(mnt), (tmp_path / "daemon.log").read_text()
        assert (mnt / "top.md").read_bytes() == tree_files("basic")[b"top.md"].data
        assert list((tmp_path / "run").glob("mnt-*.sock"))  # the control socket in RuntimeDirectory=
        out = subprocess.run(stop, env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert proc.wait(float(service["TimeoutStopSec"])) == 0  # exits before systemd would SIGTERM it
        assert not is_mounted(mnt)
        assert not list((tmp_path / "run").glob("mnt-*.sock"))
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        unmount(mnt)
