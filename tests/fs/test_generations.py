"""Archive generations (--follow) through the handlers, without a kernel: what a switch changes,
which archive an inode number and an open file read, and when an old archive may go."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from blobmount.cache import ContentStore
from blobmount.create import CreateOptions, create_archive
from blobmount.fs import ROOT_INO, BlobFS
from blobmount.generations import GEN_SHIFT, changes
from blobmount.index import IndexView
from blobmount.sources.base import Archive
from blobmount.sources.local import open_directory
from tests.support.aio import run
from tests.support.handlers import CTX, blob_fs, fuse_errno, reader_for

FLAGS = os.O_RDONLY


def _archive(tmp: Path, name: str, files: dict[str, bytes]) -> tuple[Archive, IndexView]:
    src = tmp / f"{name}-src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
        os.utime(src / rel, ns=(10**18, 10**18))
    create_archive(src, tmp / name, CreateOptions(compression="none"))
    archive = open_directory(tmp / name)
    return archive, IndexView(archive.index_bytes, blob_size=archive.data.size)


V1 = {"a.txt": b"one", "same.txt": b"same", "gone/x.txt": b"x", "d/keep.txt": b"k"}
V2 = {"a.txt": b"two!", "same.txt": b"same", "new/y.txt": b"y", "d/keep.txt": b"k"}
V3 = {"a.txt": b"three", "same.txt": b"same"}


def _fs(tmp: Path, files: dict[str, bytes]) -> tuple[BlobFS, ContentStore]:
    archive, view = _archive(tmp, "v1", files)
    store = ContentStore(tmp / "store")
    fs = blob_fs(archive, store, view=view)
    fs.follows = True
    return fs, store


def _switch(fs: BlobFS, store: ContentStore, tmp: Path, name: str, files: dict[str, bytes]) -> None:
    archive, view = _archive(tmp, name, files)
    fs.switch(archive, view, reader_for(archive, store, view=view), None)


def _read(fs: BlobFS, ino: int) -> tuple[int, bytes]:
    fh = run(fs.open, ino, FLAGS, CTX).fh
    return fh, bytes(run(fs.read, fh, 0, 1 << 20))


def test_changes_names_every_added_removed_and_changed_path(tmp_path: Path) -> None:
    _, v1 = _archive(tmp_path, "v1", V1)
    _, v2 = _archive(tmp_path, "v2", V2)
    got = changes(v1, v2)
    assert got.names == {b"a.txt", b"gone", b"gone/x.txt", b"new", b"new/y.txt"}
    assert got.dirs == {b"", b"gone", b"new"}  # the root lists gone/ and new/; a.txt changed in it
    assert (got.added, got.removed, got.changed) == (1, 1, 1)


def test_an_open_file_and_an_old_inode_keep_their_archive_across_a_switch(tmp_path: Path) -> None:
    fs, store = _fs(tmp_path, V1)
    old = run(fs.lookup, ROOT_INO, b"a.txt", CTX).st_ino
    fh, data = _read(fs, old)
    assert data == b"one"
    digest = run(fs.getxattr, ROOT_INO, b"user.blobmount.digest", CTX)

    _switch(fs, store, tmp_path, "v2", V2)
    assert run(fs.getxattr, ROOT_INO, b"user.blobmount.digest", CTX) != digest
    new = run(fs.lookup, ROOT_INO, b"a.txt", CTX).st_ino
    assert new != old
    assert new >> GEN_SHIFT == 1
    assert run(fs.read, fh, 0, 100) == b"one"  # the handle reads the archive it was opened on
    assert run(fs.getattr, old, CTX).st_size == 3  # the old number still resolves to v1
    assert _read(fs, new)[1] == b"two!"
    assert fuse_errno(fs.lookup, ROOT_INO, b"gone", CTX) == errno.ENOENT
    assert run(fs.lookup, ROOT_INO, b"new", CTX).st_mode & 0o040000
    # an unchanged file of v2 is read through v1's reader (its cached bytes)
    same = run(fs.lookup, ROOT_INO, b"same.txt", CTX).st_ino
    found = fs.file_of(same)
    assert found is not None
    assert found[0].source_of(found[1])[0].number == 0


def test_an_old_archive_goes_once_the_kernel_forgets_it_and_at_most_keep_are_alive(tmp_path: Path) -> None:
    fs, store = _fs(tmp_path, V1)
    old = run(fs.lookup, ROOT_INO, b"a.txt", CTX).st_ino
    fh, _ = _read(fs, old)
    _switch(fs, store, tmp_path, "v2", V2)
    v2_ino = run(fs.lookup, ROOT_INO, b"a.txt", CTX).st_ino
    assert sorted(fs.generations) == [0, 1]
    assert not fs.room_for_switch()  # v1 is in use (an open file, a looked-up inode): a third waits
    run(fs.release, fh)
    assert not fs.room_for_switch()
    run(fs.forget, [(old, 1)])
    assert fs.room_for_switch()
    assert sorted(fs.generations) == [0, 1]  # kept while there is room: v2's unchanged bytes are v1's

    _switch(fs, store, tmp_path, "v3", V3)
    assert sorted(fs.generations) == [1, 2]
    assert [g.number for g in fs.take_retired()] == [0]
    assert fuse_errno(fs.getattr, old, CTX) == errno.ENOENT  # forgotten by the kernel, then dropped
    assert run(fs.getattr, v2_ino, CTX).st_size == 4  # still held: still v2
    assert _read(fs, run(fs.lookup, ROOT_INO, b"a.txt", CTX).st_ino)[1] == b"three"
    found = fs.file_of(run(fs.lookup, ROOT_INO, b"same.txt", CTX).st_ino)
    assert found is not None
    assert found[0].source_of(found[1])[0].number == 1  # v1 is gone: from the oldest kept


def test_without_follow_lookups_are_not_counted(tmp_path: Path) -> None:
    fs, _ = _fs(tmp_path, V1)
    fs.follows = False
    run(fs.lookup, ROOT_INO, b"a.txt", CTX)
    assert not fs.current.lookups
