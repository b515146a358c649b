"""The README's commands are true: every line of its ```sh blocks is run here (in README order, in
one shell, with /tmp/ and the example registry replaced by a test directory and the test registry),
except lines marked "# not run in CI" (docker, kubectl, systemctl, journalctl: no engine or manager
in CI), the podman sidecar lines, which tests/fuse/test_sidecar.py runs (marked ENGINE_RUN), and
the few that a named test runs instead (EXERCISED_ELSEWHERE). `make run`, the README's
main command, is run here too: mount, check, unmount, nothing left mounted."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.mounts import daemon_pids, is_mounted, require_fuse, unmount
from tests.support.readme import ENGINE_RUN, README, sh_lines, without_comment
from tests.support.servers import Registry, free_port

ROOT = Path(__file__).resolve().parents[2]
NOT_RUN = "# not run in CI"
MUST_BE_MARKED = {"docker", "kubectl", "systemctl", "journalctl"}
MUST_BE_ENGINE_RUN = {"podman", "mmdebstrap"}
COVERED = {"blobmount", "mount", "umount", "make"}  # every such command is run, here or by a named test
# README command -> the test that runs it (each must exist: checked below)
EXERCISED_ELSEWHERE = {
    "make run": "tests/fuse/test_readme.py::test_make_run_mounts_checks_and_unmounts",
    "make umount": "tests/fuse/test_readme.py::test_make_run_mounts_checks_and_unmounts",
    "make test": ".ci/run",  # CI runs it: this very suite
    "make install": "tests/fuse/test_make_install.py::test_make_install_into_temp_dirs",
    "mount /mnt/assets": "tests/fuse/test_mount_helper.py::test_fstab_line_through_plain_mount_mnt",
}
WAIT_S = 60.0


def command_word(line: str) -> str:
    words = shlex.split(line, comments=True)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words.pop(0)
    return words[0] if words else ""


def runnable() -> list[str]:
    return [
        line
        for line in sh_lines()
        if NOT_RUN not in line and ENGINE_RUN not in line and without_comment(line) not in EXERCISED_ELSEWHERE
    ]


def test_every_readme_command_is_run_or_marked() -> None:
    lines = sh_lines()
    assert len(lines) > 20
    for line in lines:
        word = command_word(line)
        if word in MUST_BE_MARKED:
            assert line.endswith(NOT_RUN), f"README line must be marked {NOT_RUN!r}: {line}"
        elif NOT_RUN in line:
            pytest.fail(f"only docker/kubectl/systemctl/journalctl lines may skip CI: {line}")
        if word in MUST_BE_ENGINE_RUN:
            assert line.endswith(ENGINE_RUN), f"README line must be marked {ENGINE_RUN!r}: {line}"
    covered = [
        without_comment(line)
        for line in lines
        if command_word(line) in COVERED and NOT_RUN not in line and ENGINE_RUN not in line
    ]
    text = README.read_text()
    assert all(command in text for command in EXERCISED_ELSEWHERE), "stale entries"  # `make umount` is inline
    ran_here = [c for c in covered if c not in EXERCISED_ELSEWHERE]
    assert ran_here == [without_comment(line) for line in runnable() if command_word(line) in COVERED]
    for where in EXERCISED_ELSEWHERE.values():
        path, _, name = where.partition("::")
        assert (ROOT / path).exists(), where
        if name:
            assert f"def {name}(" in (ROOT / path).read_text(), where


def _cleanup(tmp: Path) -> list[int]:
    """Unmount whatever the README left under `tmp`, then end its daemons by PID (bounded)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4]
        if target.startswith(str(tmp)):
            unmount(Path(target))
    leftovers: list[int] = []
    deadline = time.monotonic() + 15
    for mnt in (tmp / "sample", tmp / "demo"):
        while (pids := daemon_pids(mnt)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        leftovers += pids
    return leftovers


@pytest.mark.fuse
def test_readme_commands_run(
    helper_installed: None, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_fuse()
    port = free_port()
    script = ["set -euxo pipefail"]
    for line in runnable():
        line = line.replace("/tmp/", f"{tmp_path}/").replace("localhost:5000", registry.host)
        script.append(line.replace("127.0.0.1:9101", f"127.0.0.1:{port}"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RUNTIME_DIRECTORY", None)
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")  # only matters when not root
    log = tmp_path / "readme.log"
    try:
        with open(log, "wb") as out:
            proc = subprocess.run(
                ["bash", "-c", "\n".join(script)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600
            )
        text = log.read_text(errors="replace")
        assert proc.returncode == 0, text[-4000:]
        assert "Everything you read here came through blobmount" in text  # `blobmount cat ... README.txt`
        assert "__main__.py" in text  # ls of the mounted sample
        assert '"ready": true' in text  # `blobmount status --json`
        assert re.search(r"^blobmount_fuse_read_bytes_total [1-9]", text, flags=re.M)  # curl /metrics
    finally:
        leftovers = _cleanup(tmp_path)
    assert leftovers == [], "README commands left daemons running"


@pytest.mark.fuse
def test_make_run_mounts_checks_and_unmounts(tmp_path: Path) -> None:
    """`make run` exactly as the README says (Make's ?= lets the environment move the mountpoint
    and the archive into this test's directory), then `make umount`."""
    require_fuse()
    mnt, archive = tmp_path / "blobmount-sample", tmp_path / "blobmount-sample-archive"
    env = dict(os.environ, MNT=str(mnt), SAMPLE_ARCHIVE=str(archive))
    try:
        out = subprocess.run(["make", "run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout + out.stderr
        assert is_mounted(mnt)
        assert (mnt / "README.txt").read_bytes() == (ROOT / "examples" / "sample" / "README.txt").read_bytes()
        assert "came through blobmount" in out.stdout
        out = subprocess.run(["make", "umount"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert not is_mounted(mnt)
    finally:
        unmount(mnt)
        deadline = time.monotonic() + 15
        while (pids := daemon_pids(mnt)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    assert pids == [], "make run's daemon outlived make umount"


def test_configuration_documents_every_option() -> None:
    """Every long option of every command, and every BLOBMOUNT_* variable of mount's, is in the
    README's Configuration section (a new flag without docs fails here)."""
    from blobmount.cli.parser import build_parser
    from blobmount.settings import env_name, subparsers

    text = README.read_text()
    config = text[text.index("## Configuration") : text.index("## Operations")]
    parser = build_parser()
    for name, sub in subparsers(parser).items():
        for action in sub._actions:
            longs = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            for option in longs:
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", config), f"{name} {option} undocumented"
            if name == "mount" and (longs or action.dest in ("source", "mountpoint")):
                assert env_name(action.dest) in config, f"{env_name(action.dest)} is not documented"
