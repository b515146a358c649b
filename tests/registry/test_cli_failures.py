"""The read-side commands (`ls`, `cat`, `inspect`, `status`, `mount`) against the failures people
meet: a registry that is down, a path the archive lacks, a reference that is no reference, a flag
value out of its choices, bytes that fail verification on the way. Each run is the real command
in a subprocess (its stderr is what a terminal shows): one line saying what is wrong, the
documented exit code, never a traceback, never a byte of a bad file on stdout."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blobmount.index import IndexView
from tests.support.faults import Fault, FaultProxy, Kind, blob
from tests.support.helpers import FIXTURES
from tests.support.servers import Registry, free_port

TIMEOUT = "1"  # --timeout: a dead registry is given up on within 4x this (the open's budget)
RUN_GUARD_S = 60.0


def blobmount(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "blobmount.cli", *args],
        capture_output=True,
        timeout=RUN_GUARD_S,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def assert_one_line(out: subprocess.CompletedProcess[bytes], code: int, *needles: str) -> str:
    err = out.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    assert out.returncode == code, f"exit {out.returncode}, expected {code}: {err}"
    assert err.startswith("blobmount: "), err
    assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def dead_registry() -> str:
    """HOST:PORT on loopback where nothing listens (connection refused)."""
    return f"127.0.0.1:{free_port()}"


# (argv with {dead} {live} {mnt} {nomnt} placeholders, exit code, text the line must hold)
CASES: dict[str, tuple[tuple[str, ...], int, str]] = {
    "ls-dead-registry": (("ls", "{dead}/team/app:v1", "--timeout", TIMEOUT), 1, "{dead}"),
    "cat-dead-registry": (("cat", "{dead}/team/app:v1", "top.md", "--timeout", TIMEOUT), 1, "{dead}"),
    "inspect-dead-registry": (("inspect", "{dead}/team/app:v1", "--timeout", TIMEOUT), 1, "{dead}"),
    "mount-dead-registry": (
        ("mount", "{dead}/team/app:v1", "{mnt}", "--timeout", TIMEOUT, "--cache-dir", "{cache}"),
        1,
        "{dead}",
    ),
    "ls-missing-path": (("ls", "{live}", "no/such/dir"), 3, "no/such/dir"),
    "cat-missing-path": (("cat", "{live}", "no-such-file"), 3, "no-such-file"),
    "cat-a-directory": (("cat", "{live}", "a"), 1, "is a directory"),
    "ls-missing-tag": (("ls", "{registry}/fixtures/basic:no-such-tag"), 3, "no such tag"),
    "ls-bad-ref": (("ls", "Team/App::v1"), 2, "Team/App::v1"),
    "cat-bad-ref": (("cat", "registry.test/a@sha256:xyz", "top.md"), 2, "sha256:xyz"),
    "inspect-bad-ref": (("inspect", "UPPER/case:v1"), 2, "UPPER/case"),
    "inspect-missing-dir": (("inspect", "./no-such-archive"), 1, "no-such-archive"),
    "mount-bad-ref": (("mount", "Team/App::v1", "{mnt}", "--cache-dir", "{cache}"), 2, "Team/App::v1"),
    "mount-missing-mountpoint": (("mount", "{live}", "{nomnt}", "--cache-dir", "{cache}"), 2, "does not exist"),
    "mount-bad-verify": (("mount", "{live}", "{mnt}", "--verify", "bogus"), 2, "--verify"),
    "mount-bad-size": (("mount", "{live}", "{mnt}", "--cache-size", "lots"), 2, "lots"),
    "status-no-daemon": (("status", "{mnt}"), 3, "no blobmount daemon answers"),
    "ls-unknown-flag": (("ls", "{live}", "--frobnicate"), 2, "--frobnicate"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_read_commands_fail_in_one_line(
    name: str, dead_registry: str, registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    argv, code, needle = CASES[name]
    (tmp_path / "mnt").mkdir()
    values = {
        "dead": dead_registry,
        "live": pushed["basic"],
        "registry": registry.host,
        "mnt": str(tmp_path / "mnt"),
        "nomnt": str(tmp_path / "no-such-mountpoint"),
        "cache": str(tmp_path / "cache"),
    }
    out = blobmount(*(arg.format(**values) for arg in argv), cwd=tmp_path)
    assert out.stdout == b""
    assert_one_line(out, code, needle.format(**values))
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.parametrize("path", [b"top.md", b"a/x.json"])
def test_cat_from_a_registry_of_bytes_that_fail_verification_exits_5(path: bytes, fault_proxy: FaultProxy) -> None:
    """Every answer for the file's bytes has one bit flipped (headers intact): `cat` writes nothing,
    names the path and the expected sha256 in one line and exits 5, as it does for a local
    archive. It once printed a 53-line ExceptionGroup traceback and exited 1."""
    view = IndexView((FIXTURES / "basic" / "index.blob").read_bytes())
    entry = view.entry(view.resolve(path))
    data_digest = "sha256:" + hashlib.sha256((FIXTURES / "basic" / "data.blob").read_bytes()).hexdigest()
    at = entry.data_offset + entry.data_size // 2
    fault = fault_proxy.add(Fault(Kind.FLIP, blob(data_digest), at=at))
    out = blobmount("cat", f"{fault_proxy.host}/fixtures/basic:v1", os.fsdecode(path), "--timeout", "5")
    assert fault.hits >= 1, "the flip was never met"
    assert out.stdout == b""
    assert_one_line(out, 5, os.fsdecode(path), entry.hash.hex())
    fault_proxy.clear()
    good = blobmount("cat", f"{fault_proxy.host}/fixtures/basic:v1", os.fsdecode(path), "--timeout", "5")
    assert good.returncode == 0, good.stderr
    assert hashlib.sha256(good.stdout).digest() == entry.hash


def test_cat_of_a_corrupt_local_file_is_one_line_too(tmp_path: Path) -> None:
    """The same from a local archive (no registry): the reader's own report of the mismatch is not
    printed beside the command's error line (it was: two lines)."""
    import shutil

    arc = tmp_path / "arc"
    shutil.copytree(FIXTURES / "basic", arc)
    view = IndexView((arc / "index.blob").read_bytes())
    entry = view.entry(view.resolve(b"top.md"))
    data = bytearray((arc / "data.blob").read_bytes())
    data[entry.data_offset + entry.data_size // 2] ^= 0x10
    (arc / "data.blob").chmod(0o644)
    (arc / "data.blob").write_bytes(data)
    out = blobmount("cat", str(arc), "top.md")
    assert out.stdout == b""
    assert_one_line(out, 5, "top.md", entry.hash.hex())
