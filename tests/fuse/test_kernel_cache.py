"""Warm work stays in the kernel (issue 17), counted from the daemon's own
``blobmount_fuse_requests_total`` on real mounts: a warm walk sends no lookup, getattr, opendir,
readdir or releasedir; a warm read-all no open, read, flush or release; a warm ``ls -l`` no
getxattr per file; at most ``WARM_BUDGET`` requests per warm phase in all. And the lever yields to
"Trust first": an archive with a lazily verified file keeps its opens. Counts, never times."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blobmount.create import CreateOptions, create_archive
from blobmount.manifest import archive_manifest
from blobmount.sources.oci_layout import write_oci_layout
from tests.support.daemon import get, samples, status
from tests.support.follow import SWITCH_WAIT_S, archive_of, served_digest
from tests.support.mounts import Mount, mounted

pytestmark = pytest.mark.fuse
WARM_BUDGET = 50  # requests per warm phase (the bound)
BIG_DIR_FILES = 2000


def _tree(src: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for d in range(12):
        for f in range(25):
            files[f"sub{d % 4}/d{d}/f{f}.txt"] = f"{d}/{f}\n".encode() * (f * 37 + 1)
    for f in range(BIG_DIR_FILES):
        files[f"big/n{f:05d}"] = f"{f}\n".encode()
    files["blob/raw.bin"] = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(3 * 32768))
    files["blob/text.c"] = b"int x;\n" * 300_000  # zstd, 2.1 MB: decoded into the store at its first read
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return files


def _requests(m_url: str) -> dict[str, float]:
    code, body = get(m_url, "/metrics")
    assert code == 200
    return {
        dict(labels)["op"]: value
        for (name, labels), value in samples(body.decode()).items()
        if name == "blobmount_fuse_requests_total"
    }


def _counted(url: str, action: Callable[[], object]) -> dict[str, int]:
    before = _requests(url)
    action()
    after = _requests(url)
    return {op: int(n - before.get(op, 0)) for op, n in after.items() if n - before.get(op, 0)}


def _walk(root: Path) -> list[tuple[str, int]]:
    out = subprocess.run(["find", str(root), "-printf", "%P %s\n"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return sorted((line.rsplit(" ", 1)[0], int(line.rsplit(" ", 1)[1])) for line in out.stdout.splitlines())


def _read_all(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        with open(root / rel, "rb") as f:
            assert f.read() == data, rel


def _ls_l(directory: Path) -> None:
    out = subprocess.run(["ls", "-l", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == BIG_DIR_FILES + 1  # "total" and one line per file


def _metrics_url(m: Mount) -> str:
    out = status(m.path, "--json")
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["metrics_url"])


def test_warm_walk_read_all_and_ls_stay_in_the_kernel(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    create_archive(tmp_path / "src", tmp_path / "arch", CreateOptions())
    with mounted(f"dir:{tmp_path / 'arch'}", tmp_path / "mnt", "--metrics", "127.0.0.1:0") as m:
        url = _metrics_url(m)
        cold_walk = _counted(url, lambda: _walk(m.path))
        assert cold_walk.get("readdir", 0) > 0  # the cold phase did reach the daemon
        listing = _walk(m.path)
        cold_read = _counted(url, lambda: _read_all(m.path, files))
        assert cold_read.get("read", 0) > 0
        cold_ls = _counted(url, lambda: _ls_l(m.path / "big"))

        warm_walk = _counted(url, lambda: _walk(m.path))
        warm_read = _counted(url, lambda: _read_all(m.path, files))
        warm_ls = _counted(url, lambda: _ls_l(m.path / "big"))
        assert _walk(m.path) == listing
    for phase, counts in (("walk", warm_walk), ("read-all", warm_read), ("ls -l", warm_ls)):
        assert sum(counts.values()) <= WARM_BUDGET, (phase, counts)
    for op in ("lookup", "getattr", "opendir", "readdir", "releasedir"):
        assert op not in warm_walk, warm_walk
    for op in ("open", "read", "flush", "release"):
        assert op not in warm_read, warm_read
    # ls -l asks for security.selinux and system.posix_acl_access: answered EOPNOTSUPP, which ls
    # remembers for the filesystem, so once per run (with ENODATA: once per file, every run)
    assert cold_ls.get("getxattr", 0) <= 2, cold_ls
    assert warm_ls.get("getxattr", 0) <= 2, warm_ls
    assert 1 <= cold_read.get("open", 0) <= 2  # the first open answered ENOSYS: no more


def test_a_lazily_verified_file_keeps_opens_and_xattrs_stay_readable(tmp_path: Path) -> None:
    """raw.bin (3 MiB) is above --verify-threshold, so served before it is verified whole: its
    opens must reach the daemon (a handle opened before a mismatch fails), and so every open does."""
    files = _tree(tmp_path / "src")
    create_archive(tmp_path / "src", tmp_path / "arch", CreateOptions())
    args = ("--metrics", "127.0.0.1:0", "--verify-threshold", "1048576")
    with mounted(f"dir:{tmp_path / 'arch'}", tmp_path / "mnt", *args) as m:
        url = _metrics_url(m)
        _read_all(m.path, files)
        some = {k: files[k] for k in list(files)[:20]}
        warm = _counted(url, lambda: _read_all(m.path, some))
        assert warm.get("open", 0) == len(some), warm
        raw = m.path / "blob" / "raw.bin"
        assert os.getxattr(raw, "user.blobmount.sha256") == hashlib.sha256(files["blob/raw.bin"]).hexdigest().encode()
        assert os.getxattr(raw, "user.blobmount.verified") == b"verified"  # read whole above
        with pytest.raises(OSError) as info:
            os.getxattr(raw, "security.selinux")
        assert info.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as info:
            os.getxattr(raw, "user.other")
        assert info.value.errno == errno.ENODATA


def test_follow_in_no_open_mode_serves_new_bytes_and_verifies_a_later_big_file_first(tmp_path: Path) -> None:
    """--follow with the first archive in no-open mode (small files only): the kernel keeps pages
    of the old inodes, but a switch gives every file a new inode, so a same-size change is read
    new; and a later archive's file above --verify-threshold is verified whole before its first
    byte (no open of it reaches the daemon, so it cannot be verified lazily)."""
    big = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(6 * 32768))  # 6 MiB
    v1 = archive_of(tmp_path, "v1", {"f.txt": b"version 1\n", "g.txt": b"g\n"})
    v2 = archive_of(tmp_path, "v2", {"f.txt": b"version 2\n", "big.bin": big})
    layout = tmp_path / "layout"
    write_oci_layout(v1, f"{layout}:t", archive_manifest(v1, {}))
    args = ("--follow", "--follow-interval", "1", "--metrics", "127.0.0.1:0")
    with mounted(f"oci:{layout}:t", tmp_path / "mnt", *args) as m:
        url = _metrics_url(m)
        before = served_digest(m.path)
        assert (m.path / "f.txt").read_bytes() == b"version 1\n"
        again = _counted(url, lambda: (m.path / "f.txt").read_bytes())
        assert "open" not in again  # no-open mode: the first archive holds no lazily verified file
        assert "read" not in again
        write_oci_layout(v2, f"{layout}:t", archive_manifest(v2, {}))
        started = time.monotonic()
        while served_digest(m.path) == before:
            assert time.monotonic() - started < SWITCH_WAIT_S, m.log()
            time.sleep(0.1)
        assert (m.path / "f.txt").read_bytes() == b"version 2\n"  # same size, new inode: new pages
        with open(m.path / "big.bin", "rb") as f:
            assert f.read(4096) == big[:4096]
        # one page read, yet verified: the whole file was hashed before that first byte
        assert os.getxattr(m.path / "big.bin", "user.blobmount.verified") == b"verified"
