"""`create` and `push oci:` against ordinary filesystem failures of their output: a file where the
output directory should be (EEXIST), a path under a file (ENOTDIR), a read-only filesystem (EROFS),
a full one (ENOSPC). Each is one line naming the path and the reason, exit 1 (README: Exit codes),
no traceback on the terminal and no partial file left behind.

Run as the real command in a subprocess, so what reaches the terminal is exactly what a user sees.
The read-only and full filesystems are small tmpfs mounts (root: the suite runs as root for FUSE
anyway), unmounted even when a test fails."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blobmount.errors import EXIT_ERROR

WAIT_S = 60.0
REASONS = {
    "file": "exists and is not a directory",
    "under-file": "Not a directory",
    "read-only": "Read-only file system",
    "full": "No space left on device",
}


@contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=1m", *options)), "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, timeout=WAIT_S)


@contextmanager
def target(kind: str, tmp: Path) -> Iterator[Path]:
    """A path to write the output to that fails the `kind` way."""
    if kind in ("file", "under-file"):
        (tmp / "a-file").write_text("in the way\n")
        yield tmp / "a-file" if kind == "file" else tmp / "a-file" / "out"
        return
    with tmpfs(tmp / "fs", *(["ro"] if kind == "read-only" else [])) as fs:
        yield fs / "out"
        leftovers = [p.name for p in fs.rglob("*") if p.name.endswith(".tmp")]
        assert leftovers == []


def source_tree(tmp: Path) -> Path:
    """3 MiB that does not compress, so it cannot fit a 1 MiB filesystem either way."""
    src = tmp / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(1).randbytes(3 << 20))
    (src / "small.txt").write_text("hello\n")
    return src


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blobmount.cli", *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, **(env or {})},
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], path: Path, reason: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == EXIT_ERROR, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("blobmount: "), proc.stderr
    assert reason in proc.stderr, proc.stderr
    assert str(path) in proc.stderr, proc.stderr


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_create_into_a_bad_place_is_one_line(kind: str, tmp_path: Path) -> None:
    src = source_tree(tmp_path)
    with target(kind, tmp_path) as out:
        proc = run(["create", str(src), str(out)])
        assert_one_line(proc, out, REASONS[kind])
        if kind == "full":
            assert sorted(p.name for p in out.iterdir()) == []  # no half archive under the final names


@pytest.mark.parametrize("kind", sorted(REASONS))
@pytest.mark.parametrize("given", ["directory", "archive"])
def test_push_into_a_bad_oci_layout_is_one_line(given: str, kind: str, tmp_path: Path) -> None:
    src = source_tree(tmp_path)
    if given == "archive":
        assert run(["create", str(src), str(tmp_path / "arc"), "--compression", "none"]).returncode == 0
    args = ["--archive", str(tmp_path / "arc")] if given == "archive" else [str(src)]
    with target(kind, tmp_path) as layout:
        proc = run(["push", *args, f"oci:{layout}:v1", "--created", "2024-01-02T03:04:05Z"])
        assert_one_line(proc, layout, "Not a directory" if kind == "file" else REASONS[kind])


def test_push_with_a_full_temporary_directory_is_one_line(tmp_path: Path) -> None:
    """push builds the archive under $TMPDIR first: that filling up is the same one line."""
    src = source_tree(tmp_path)
    with tmpfs(tmp_path / "tmp") as tmp:
        proc = run(["push", str(src), f"oci:{tmp_path / 'layout'}:v1"], env={"TMPDIR": str(tmp)})
        assert_one_line(proc, tmp, REASONS["full"])
        assert list(tmp.iterdir()) == []
