"""The reference implementation's archives read back exactly (docs/FORMAT.md), and our writer reproduces
them: byte-identical where the format allows, field-identical otherwise."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from blobmount.cache import ContentStore
from blobmount.create import CreateOptions, create_archive
from blobmount.index import Entry, IndexView, Order
from blobmount.reader import Reader
from blobmount.sources.local import LocalFileSource, open_directory
from tests.support.helpers import FIXTURE_NAMES, FIXTURES, entry_path, expected, extract_tree, tree_files

FIELDS = ("data_offset", "data_size", "original_size", "mode", "uid", "gid", "mtime_ns", "compression")


def read_all(reader: Reader, entry: Entry) -> bytes:
    async def run() -> bytes:
        return b"".join([block async for block in reader.stream_verified(entry)])

    return trio.run(run)


def open_view(path: Path) -> tuple[IndexView, Reader, LocalFileSource]:
    archive = open_directory(path)
    assert isinstance(archive.data, LocalFileSource)
    view = IndexView(archive.index_bytes, blob_size=archive.data.size)
    return view, Reader(archive.data, ContentStore(path.parent / f".cache-{path.name}")), archive.data


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_reads_as_expected(name: str, tmp_path: Path) -> None:
    exp = expected(name)
    archive = open_directory(FIXTURES / name)
    view = IndexView(archive.index_bytes, blob_size=archive.data.size)
    reader = Reader(archive.data, ContentStore(tmp_path / "cache"))
    assert view.version == exp["version"]
    assert view.hash_algorithm == exp["hash_algorithm"]
    assert view.data_size == exp["data_size"]
    assert (view.data_hash.hex() if view.data_hash else "") == exp["data_hash"]
    assert len(view) == exp["entry_count"]
    assert (view.order is Order.BYTES) == exp["entries_sorted_bytewise"]
    items = exp["entries"]
    assert isinstance(items, list)
    for i, item in enumerate(items):
        entry = view.entry(i)
        assert entry.path == entry_path(item)
        for field in FIELDS:
            assert getattr(entry, field) == item[field], (entry.path, field)
        assert entry.hash.hex() == item["hash"]
        # every entry is found, including those the reference's own reader cannot find
        assert view.find(entry.path) == i
        assert view.kind(entry.path) == i
        assert hashlib.sha256(read_all(reader, entry)).hexdigest() == item["content_sha256"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_matches_its_tree(name: str, tmp_path: Path) -> None:
    """Contents, modes, owners and ns mtimes as tree.tar.gz has them; listings imply its dirs."""
    files = tree_files(name)
    archive = open_directory(FIXTURES / name)
    view = IndexView(archive.index_bytes, blob_size=archive.data.size)
    reader = Reader(archive.data, ContentStore(tmp_path / "cache"))
    assert {view.entry(i).path for i in range(len(view))} == set(files)
    for path, f in files.items():
        entry = view.entry(view.resolve(path))
        assert (entry.mode, entry.uid, entry.gid, entry.mtime_ns) == (f.mode & 0o777, f.uid, f.gid, f.mtime_ns)
        assert read_all(reader, entry) == f.data
    dirs: dict[bytes, set[bytes]] = {b"": set()}
    for path in files:
        parts = path.split(b"/")
        for depth in range(len(parts)):
            parent = b"/".join(parts[:depth])
            dirs.setdefault(parent, set()).add(parts[depth])
    for directory, names in dirs.items():
        assert {c.name for c in view.children(directory)} == names, directory
        assert view.kind(directory) == -1


@pytest.mark.expect_log("symlink skipped")
def test_create_none_is_byte_identical_to_the_reference(tmp_path: Path) -> None:
    tree = extract_tree("uncompressed", tmp_path / "src")
    create_archive(tree, tmp_path / "out", CreateOptions(compression="none"))
    ref = FIXTURES / "uncompressed"
    assert (tmp_path / "out" / "index.blob").read_bytes() == (ref / "index.blob").read_bytes()
    assert (tmp_path / "out" / "data.blob").read_bytes() == (ref / "data.blob").read_bytes()


@pytest.mark.expect_log("symlink skipped")
def test_create_of_empty_tree_is_byte_identical(tmp_path: Path) -> None:
    tree = extract_tree("empty", tmp_path / "src")
    create_archive(tree, tmp_path / "out")
    ref = FIXTURES / "empty"
    assert (tmp_path / "out" / "index.blob").read_bytes() == (ref / "index.blob").read_bytes()
    assert (tmp_path / "out" / "data.blob").read_bytes() == b""


@pytest.mark.parametrize("name", ["basic", "mixed", "unicode"])
@pytest.mark.expect_log("symlink skipped")
def test_create_zstd_matches_reference_fields(name: str, tmp_path: Path) -> None:
    tree = extract_tree(name, tmp_path / "src")
    create_archive(tree, tmp_path / "out")
    view, reader, _ = open_view(tmp_path / "out")
    assert view.order is Order.BYTES
    exp_items = expected(name)["entries"]
    assert isinstance(exp_items, list)
    by_path = {entry_path(item): item for item in exp_items}
    assert {view.entry(i).path for i in range(len(view))} == set(by_path)
    paths = [view.entry(i).path for i in range(len(view))]
    assert paths == sorted(paths)
    for i in range(len(view)):
        entry = view.entry(i)
        item = by_path[entry.path]
        assert entry.compression == item["compression"], entry.path
        for field in ("original_size", "mode", "uid", "gid", "mtime_ns"):
            assert getattr(entry, field) == item[field], (entry.path, field)
        if entry.compression == 0:
            assert entry.data_size == item["data_size"]
        assert entry.hash.hex() == item["hash"]
        assert hashlib.sha256(read_all(reader, entry)).hexdigest() == item["content_sha256"]
