"""Shared test helpers: the golden fixtures, extracting their trees exactly, OCI layouts."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "go-reference"
REFERENCE_CREATED = "2024-01-02T03:04:05Z"  # the annotation the fixtures' oci-manifest.json carries
FIXTURE_NAMES = ("basic", "uncompressed", "unicode", "empty", "mixed")


def expected(name: str) -> dict[str, object]:
    doc = json.loads((FIXTURES / name / "expected.json").read_text())
    assert isinstance(doc, dict)
    return doc


def entry_path(item: dict[str, object]) -> bytes:
    if "path_hex" in item:
        return bytes.fromhex(str(item["path_hex"]))
    return str(item["path"]).encode()


@dataclass(frozen=True)
class TreeFile:
    path: bytes  # relative to the tree root
    mode: int  # permission bits as stored (setuid etc. dropped)
    uid: int
    gid: int
    mtime_ns: int
    data: bytes


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is not None:
        return int(Decimal(text) * 1_000_000_000)
    return int(member.mtime) * 1_000_000_000


def tree_files(name: str) -> dict[bytes, TreeFile]:
    """The regular files of a fixture's tree.tar.gz, as the archive must present them."""
    files: dict[bytes, TreeFile] = {}
    with tarfile.open(FIXTURES / name / "tree.tar.gz", errors="surrogateescape") as tar:
        for member in tar.getmembers():
            if not member.isreg():
                if member.islnk():  # hard links are archived as independent entries
                    target = tar.getmember(member.linkname)
                    data = tar.extractfile(target).read()  # type: ignore[union-attr]
                    rel = os.fsencode(member.name).split(b"/", 1)[1]
                    files[rel] = TreeFile(rel, member.mode & 0o777, member.uid, member.gid, _mtime_ns(member), data)
                continue
            rel = os.fsencode(member.name).split(b"/", 1)[1]
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            files[rel] = TreeFile(rel, member.mode & 0o777, member.uid, member.gid, _mtime_ns(member), data)
    return files


def extract_tree(name: str, dest: Path) -> Path:
    """Extract a fixture's tree with owners, modes and nanosecond mtimes intact; return its root."""
    with tarfile.open(FIXTURES / name / "tree.tar.gz", errors="surrogateescape") as tar:
        members = tar.getmembers()
        # `filter=` exists from 3.11.4 on (and is expected from 3.14); Debian's 3.11.2 lacks it
        trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tar.extractall(dest, **trusted)  # type: ignore[arg-type]
        for member in sorted(members, key=lambda m: -len(m.name)):  # children before parents
            path = os.path.join(os.fsencode(dest), os.fsencode(member.name))
            if member.issym():
                continue
            os.chown(path, member.uid, member.gid, follow_symlinks=False)
            os.chmod(path, member.mode & 0o7777)
            ns = _mtime_ns(member)
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
    return dest / "tree"


def make_oci_layout(fixture_dir: Path, dest: Path, tag: str = "v1", manifest: bytes | None = None) -> Path:
    """An OCI image layout holding the archive in `fixture_dir` under `tag`."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = (fixture_dir / "index.blob").read_bytes()
    data = (fixture_dir / "data.blob").read_bytes()
    if manifest is None:
        manifest = (fixture_dir / "oci-manifest.json").read_bytes()
    for blob in (index, data, b"{}", manifest):
        (blobs / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    desc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
        "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return dest


def is_regular(path: Path) -> bool:
    return stat.S_ISREG(os.lstat(path).st_mode)
