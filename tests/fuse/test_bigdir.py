"""A directory of 100,000 entries through a real mount: readdir must return every name exactly once
(offsets stay stable across the many readdir calls the kernel makes), with `.` and `..`."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from blobmount.index import EntryRecord, build_index
from tests.support.mounts import mounted

pytestmark = pytest.mark.fuse

EMPTY = hashlib.sha256(b"").digest()
COUNT = 100_000


def _write_archive(out: Path, paths: list[bytes]) -> None:
    out.mkdir()
    records = [EntryRecord(p, 0, 0, 0, EMPTY, 0o644, 0, 0, 0, 0) for p in sorted(paths)]
    (out / "index.blob").write_bytes(build_index(records, 0, hashlib.sha256(b"").digest()))
    (out / "data.blob").write_bytes(b"")


def test_readdir_of_100k_entries_lists_each_name_once(tmp_path: Path) -> None:
    names = [b"f-%06d.txt" % i for i in range(COUNT)]
    # neighbours that sort between the big directory's entries in byte order but not in walk order
    paths = [b"big/" + n for n in names] + [b"big-sibling", b"big.txt", b"zz/inner/x"]
    _write_archive(tmp_path / "arc", paths)
    with mounted(f"dir:{tmp_path / 'arc'}", tmp_path / "mnt") as m:
        listed = os.listdir(os.fsencode(m.path / "big"))
        assert len(listed) == COUNT
        assert set(listed) == set(names)
        ls = subprocess.run(["ls", "-a", "-f", str(m.path / "big")], capture_output=True, check=True)
        out = ls.stdout.split(b"\n")[:-1]
        assert sorted(out[:2]) == [b".", b".."] or {b".", b".."} <= set(out)
        assert len(out) == COUNT + 2
        assert sorted(os.listdir(m.path)) == ["big", "big-sibling", "big.txt", "zz"]
        assert os.stat(m.path / "big").st_nlink == 2
        assert os.stat(m.path).st_nlink == 4  # root: big, zz
        assert os.stat(m.path / "big" / "f-099999.txt").st_size == 0
