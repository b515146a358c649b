"""The sources and archives of tests/fuse/test_mounted.py and its kernel-free twins
(tests/fs/test_mounted_twins.py), written once so the two cannot drift: an archive directory made
into a SOURCE of each kind, an archive for concurrent random reads, and a tampered archive."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blobmount.create import create_archive
from blobmount.index import IndexView
from blobmount.manifest import DATA_MEDIA_TYPE, INDEX_MEDIA_TYPE, Descriptor, build_manifest
from blobmount.reference import Digest
from tests.support.helpers import make_oci_layout
from tests.support.mounts import push_dir
from tests.support.servers import Registry

SOURCES = ("dir", "oci", "registry")
SourceFor = Callable[[Path], str]
RANDOM_FILES = ("raw.jpg", "text.txt")
RANDOM_READS = 150  # per reader
RANDOM_READERS = 16


def source_maker(request: pytest.FixtureRequest, tmp_path: Path, repo_prefix: str) -> SourceFor:
    """For a fixture parametrized with SOURCES: an archive directory as a SOURCE string of that
    kind (a registry one pushed under `repo_prefix`/<test name><n>)."""
    kind = request.param
    counter = iter(range(1000))

    def make(archive: Path) -> str:
        n = next(counter)
        if kind == "dir":
            return f"dir:{archive}"
        if kind == "oci":
            layout = make_oci_layout(archive, tmp_path / f"layout{n}", manifest=manifest_for(archive))
            return f"oci:{layout}:v1"
        registry: Registry = request.getfixturevalue("registry")
        name = request.node.name.lower().replace("[", "-").rstrip("]")
        return push_dir(registry, archive, f"{repo_prefix}/{name}{n}")

    return make


def manifest_for(archive: Path) -> bytes:
    index, data = (archive / "index.blob").read_bytes(), (archive / "data.blob").read_bytes()
    return build_manifest(
        Descriptor(INDEX_MEDIA_TYPE, Digest.of(index), len(index)),
        Descriptor(DATA_MEDIA_TYPE, Digest.of(data), len(data)),
        {"org.opencontainers.image.created": "2024-01-02T03:04:05Z"},
    )


def random_read_archive(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """TMP/arc: an 8 MiB raw file and a compressible zstd one (both reader paths), and their bytes."""
    rng = random.Random(11)
    src = tmp_path / "src"
    src.mkdir()
    files = {
        "raw.jpg": rng.randbytes(8 << 20),  # .jpg: stored raw by the skip rule
        "text.txt": b"".join(b"line %08d of a compressible file\n" % i for i in range(250_000)),  # zstd
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    create_archive(src, tmp_path / "arc")
    view = IndexView((tmp_path / "arc" / "index.blob").read_bytes())
    assert {view.entry(i).compression for i in range(len(view))} == {0, 1}
    return tmp_path / "arc", files


def random_reads(seed: int, files: dict[str, bytes]) -> Iterator[tuple[str, int, int]]:
    """One reader's (name, offset, size) reads, some past the end of the file."""
    r = random.Random(seed)
    for _ in range(RANDOM_READS):
        name = r.choice(RANDOM_FILES)
        off = r.randrange(0, len(files[name]) + 1000)
        yield name, off, r.randrange(1, 300_000)


def tampered_archive(tmp_path: Path, big: bool = True) -> tuple[Path, dict[str, bytes]]:
    """TMP/tarc: small raw, zstd and innocent files (and a 24 MiB raw one, lazily verified), to be
    flipped by :func:`flip`; and their right bytes."""
    src = tmp_path / "tsrc"
    src.mkdir()
    rng = random.Random(3)
    contents = {
        "small.jpg": rng.randbytes(5000) + b".",  # .jpg: stored raw
        "text.txt": b"compressible text\n" * 5000,
        "other.txt": b"an innocent neighbour\n" * 100,
    }
    if big:
        contents["big.jpg"] = rng.randbytes(24 << 20)
    for name, data in contents.items():
        (src / name).write_bytes(data)
    create_archive(src, tmp_path / "tarc")
    return tmp_path / "tarc", contents


def flip(archive: Path, name: bytes, at_fraction: float = 0.5) -> tuple[str, str]:
    """Flip one stored bit of `name` in the data blob: (the sha256 the index expects, the one the
    stored bytes now have)."""
    view = IndexView((archive / "index.blob").read_bytes())
    entry = view.entry(view.resolve(name))
    data = bytearray((archive / "data.blob").read_bytes())
    pos = entry.data_offset + int(entry.data_size * at_fraction)
    data[pos] ^= 0x01
    (archive / "data.blob").write_bytes(data)
    actual = hashlib.sha256(bytes(data[entry.data_offset : entry.data_offset + entry.data_size])).hexdigest()
    return entry.hash.hex(), actual
