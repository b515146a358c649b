"""Operations handlers called directly (no kernel): errno expectations, inode model, xattrs, and the
rule that only FUSEError ever leaves a handler."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import pytest
import trio

from blobmount import errors
from blobmount.fs import FILE_INO_BASE, ROOT_INO, BlobFS
from blobmount.index import Entry, IndexView
from blobmount.index.view import Listed
from blobmount.readahead import ReadHint
from blobmount.sources.local import LocalFileSource, open_directory
from blobmount.sources.oci_layout import open_oci_layout
from tests.support.aio import run
from tests.support.handlers import CTX, blob_fs, fuse_errno, list_dir
from tests.support.helpers import make_oci_layout, tree_files

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "go-reference"
T = TypeVar("T")


def make_fs(tmp_path: Path, fixture: str = "basic") -> BlobFS:
    return blob_fs(open_directory(FIXTURES / fixture), tmp_path / "cache")


def test_every_error_class_is_mapped_to_its_errno() -> None:
    expected = {
        errors.NotFound: errno.ENOENT,
        errors.NotADirectory: errno.ENOTDIR,
        errors.IsADirectory: errno.EISDIR,
        errors.ReadOnly: errno.EROFS,
        errors.NoAttribute: errno.ENODATA,
        errors.RequestNotNeeded: errno.ENOSYS,
        errors.NotSupported: errno.EOPNOTSUPP,
        errors.LimitExceeded: errno.EFBIG,
        errors.InvalidArchive: errno.EIO,
        errors.IntegrityError: errno.EIO,
        errors.SourceError: errno.EIO,
        errors.TransientError: errno.EIO,
        errors.Unservable: errno.EIO,
        errors.AuthError: errno.EACCES,
        errors.UsageError: errno.EINVAL,
        errors.DestinationError: errno.EIO,  # never reaches the kernel (cp, create), the table's default
    }
    classes = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.BlobmountError)}
    assert classes - {errors.BlobmountError} == set(expected), "a new error class needs a row here"
    for cls, code in expected.items():
        assert errors.errno_for(cls("x")) == code, cls
    assert errors.errno_for(RuntimeError("boom")) == errno.EIO


def test_lookup_getattr_and_inode_model(tmp_path: Path) -> None:
    fs = make_fs(tmp_path)
    a = run(fs.lookup, ROOT_INO, b"a", CTX)
    assert stat.S_ISDIR(a.st_mode)
    assert a.st_mode & 0o777 == 0o755
    assert a.st_ino >= FILE_INO_BASE + len(fs.view)  # directories live above the file inodes
    assert run(fs.lookup, ROOT_INO, b"a", CTX).st_ino == a.st_ino  # stable
    x = run(fs.lookup, a.st_ino, b"x.json", CTX)
    entry = fs.view.entry(fs.view.find(b"a/x.json") or 0)
    assert x.st_ino == FILE_INO_BASE + entry.number
    assert x.st_size == entry.original_size
    assert x.st_mtime_ns == entry.mtime_ns
    assert (x.st_uid, x.st_gid) == (entry.uid, entry.gid)
    assert x.st_blocks == (entry.original_size + 511) // 512
    assert run(fs.lookup, a.st_ino, b"..", CTX).st_ino == ROOT_INO
    assert run(fs.lookup, a.st_ino, b".", CTX).st_ino == a.st_ino
    assert run(fs.getattr, ROOT_INO, CTX).st_nlink == 2 + sum(1 for c in fs.view.children(b"") if c.is_dir)
    assert fuse_errno(fs.lookup, ROOT_INO, b"nope", CTX) == errno.ENOENT
    assert fuse_errno(fs.lookup, x.st_ino, b"child", CTX) == errno.ENOTDIR
    assert fuse_errno(fs.getattr, 10**9, CTX) == errno.ENOENT


def test_owner_overrides(tmp_path: Path) -> None:
    fs = blob_fs(open_directory(FIXTURES / "basic"), tmp_path / "c", uid=4242, gid=4343)
    attr = run(fs.lookup, ROOT_INO, b"top.md", CTX)
    assert (attr.st_uid, attr.st_gid) == (4242, 4343)
    assert (run(fs.getattr, ROOT_INO, CTX).st_uid, run(fs.getattr, ROOT_INO, CTX).st_gid) == (4242, 4343)


def test_open_read_release_and_xattrs(tmp_path: Path) -> None:
    fs = make_fs(tmp_path, "mixed")
    number = next(i for i in range(len(fs.view)) if fs.view.entry(i).compression == 1)
    entry = fs.view.entry(number)
    ino = FILE_INO_BASE + number

    async def body() -> bytes:
        info = await fs.open(ino, os.O_RDONLY, CTX)
        assert info.keep_cache
        chunks = []
        off = 0
        while block := await fs.read(info.fh, off, 65536):
            chunks.append(block)
            off += len(block)
        await fs.release(info.fh)
        return b"".join(chunks)

    data = run(body)
    assert hashlib.sha256(data).digest() == entry.hash
    assert run(fs.getxattr, ino, b"user.blobmount.sha256", CTX) == entry.hash.hex().encode()
    assert run(fs.getxattr, ino, b"user.blobmount.compression", CTX) == b"zstd"
    assert run(fs.getxattr, ino, b"user.blobmount.stored_size", CTX) == str(entry.data_size).encode()
    assert run(fs.getxattr, ino, b"user.blobmount.verified", CTX) == b"verified"
    assert run(fs.listxattr, ino, CTX) == []  # readable by name, never listed (copies would keep them)
    assert run(fs.listxattr, ROOT_INO, CTX) == []
    assert fuse_errno(fs.getxattr, ino, b"user.other", CTX) == errno.ENODATA
    assert fuse_errno(fs.getxattr, ROOT_INO, b"user.blobmount.sha256", CTX) == errno.ENODATA
    st = run(fs.statfs, CTX)
    assert st.f_files == len(fs.view)
    assert st.f_blocks * st.f_frsize >= fs.view.blob_size


def test_writes_and_write_opens_are_erofs(tmp_path: Path) -> None:
    fs = make_fs(tmp_path)
    ino = FILE_INO_BASE
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND):
        assert fuse_errno(fs.open, ino, flags, CTX) == errno.EROFS
    assert fuse_errno(fs.mkdir, ROOT_INO, b"d", 0o755, CTX) == errno.EROFS
    assert fuse_errno(fs.unlink, ROOT_INO, b"top.md", CTX) == errno.EROFS
    assert fuse_errno(fs.write, 1, 0, b"x") == errno.EROFS
    assert fuse_errno(fs.setxattr, ino, b"user.x", b"1", CTX) == errno.EROFS
    assert fuse_errno(fs.access, ino, os.W_OK, CTX) == errno.EROFS
    assert run(fs.access, ino, os.R_OK, CTX)
    assert fuse_errno(fs.open, ROOT_INO, os.O_RDONLY, CTX) == errno.EISDIR


@pytest.mark.expect_log("unexpected error in lookup; answered EIO")
def test_unexpected_exception_is_eio_and_the_fs_keeps_serving(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fs = make_fs(tmp_path)

    class BrokenView(IndexView):
        def kind(self, path: bytes) -> int | None:
            if path == b"top.md":
                raise RuntimeError("simulated bug")
            return super().kind(path)

    archive = open_directory(FIXTURES / "basic")
    fs.view = BrokenView(archive.index_bytes, blob_size=archive.data.size)
    assert fuse_errno(fs.lookup, ROOT_INO, b"top.md", CTX) == errno.EIO
    assert "simulated bug" in caplog.text
    assert "Traceback" in caplog.text
    assert run(fs.lookup, ROOT_INO, b"small.txt", CTX).st_size > 0


def test_cached_bytes_xattr_hook(tmp_path: Path) -> None:
    """user.blobmount.cached_bytes exists only when the filesystem was given the chunk store's count."""
    fs = make_fs(tmp_path)
    ino = run(fs.lookup, ROOT_INO, b"top.md", CTX).st_ino
    name = b"user.blobmount.cached_bytes"
    assert fuse_errno(fs.getxattr, ino, name, CTX) == errno.ENODATA
    fs = blob_fs(open_directory(FIXTURES / "basic"), tmp_path / "cache", cached_bytes=lambda e: e.original_size // 2)
    entry = fs.view.entry(ino - FILE_INO_BASE)
    assert run(fs.getxattr, ino, name, CTX) == str(entry.original_size // 2).encode()


ARCHIVE_TIME_NS = 1_746_515_289_000_000_000  # 2025-05-06T07:08:09Z: no file of the fixtures has it


def _dir_inode(fs: BlobFS, path: bytes) -> int:
    ino = ROOT_INO
    for name in path.split(b"/") if path else ():
        ino = run(fs.lookup, ino, name, CTX).st_ino
    return ino


@pytest.mark.parametrize("fixture", ["basic", "mixed", "unicode"])
def test_directory_times_are_their_newest_file_else_the_archive_time(tmp_path: Path, fixture: str) -> None:
    archive = open_directory(FIXTURES / fixture)
    fs = blob_fs(archive, tmp_path / "c", dir_time_ns=ARCHIVE_TIME_NS)
    view = fs.view
    entries = [view.entry(i) for i in range(len(view))]
    dirs = {b"/".join(e.path.split(b"/")[:k]) for e in entries for k in range(e.path.count(b"/") + 1)}
    want = {
        d: max((e.mtime_ns for e in entries if e.path.rpartition(b"/")[0] == d), default=ARCHIVE_TIME_NS) for d in dirs
    }
    for d, expected_ns in want.items():
        attr = run(fs.getattr, _dir_inode(fs, d), CTX)
        assert (attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns) == (expected_ns,) * 3, d
    if fixture == "basic":
        # only subdirectories: the archive's time; a directory holding the one nanosecond mtime
        # (newer than its siblings' 03:04:05 sharp) takes that file's time, not any file's
        assert want[b"deeply"] == want[b"deeply/nested"] == ARCHIVE_TIME_NS
        ns_file = next(e for e in entries if e.mtime_ns % 1_000_000_000)
        parent = ns_file.path.rpartition(b"/")[0]
        assert want[parent] == ns_file.mtime_ns
        assert any(e.mtime_ns < ns_file.mtime_ns for e in entries if e.path.rpartition(b"/")[0] == parent)
    if fixture == "mixed":
        assert want[b""] == ARCHIVE_TIME_NS  # a root of directories only


def test_directory_time_is_computed_once_per_directory(tmp_path: Path) -> None:
    calls: list[bytes] = []

    class CountingView(IndexView):
        def child_entries(self, directory: bytes, start_pos: int = 0) -> Iterator[Listed]:
            calls.append(directory)
            return super().child_entries(directory, start_pos)

    archive = open_directory(FIXTURES / "basic")
    view = CountingView(archive.index_bytes, blob_size=archive.data.size)
    fs = blob_fs(archive, tmp_path / "c", view=view, dir_time_ns=ARCHIVE_TIME_NS)
    a = run(fs.lookup, ROOT_INO, b"a", CTX)
    assert calls == [b"a"]  # one pass over its files, nothing deeper
    assert run(fs.getattr, a.st_ino, CTX).st_mtime_ns == a.st_mtime_ns
    assert run(fs.lookup, ROOT_INO, b"a", CTX).st_mtime_ns == a.st_mtime_ns
    assert calls == [b"a"]  # kept with the directory's inode


@pytest.mark.parametrize(("fixture", "room"), [("basic", None), ("basic", 2), ("mixed", None)])
def test_a_cold_walk_reads_each_entry_once(tmp_path: Path, fixture: str, room: int | None) -> None:
    """readdirplus of a directory whose time pass ran when its parent was listed (a walk) reads no
    file entry again: each entry's table is read and validated once (IndexView.child_entries
    shares the view's entry cache), whether the listing takes one request or many."""
    fast: list[int] = []

    class CountingView(IndexView):
        def _entry_fast(self, i: int, checked_path: bytes | None = None) -> Entry | None:
            fast.append(i)
            return super()._entry_fast(i, checked_path)

    archive = open_directory(FIXTURES / fixture)
    view = CountingView(archive.index_bytes, blob_size=archive.data.size)
    fs = blob_fs(archive, tmp_path / "c", view=view, dir_time_ns=ARCHIVE_TIME_NS)
    seen: dict[bytes, pyfuse3.EntryAttributes] = {}

    def walk(ino: int, path: bytes) -> None:
        for listed in run(list_dir, fs, ino, room):
            name, attr = listed.name, listed.attr
            if name in (b".", b".."):
                continue
            child = path + b"/" + name if path else name
            seen[child] = attr
            if stat.S_ISDIR(attr.st_mode):
                walk(attr.st_ino, child)

    walk(ROOT_INO, b"")
    files = {e.path: e for e in view.entries()}
    assert {p for p, a in seen.items() if stat.S_ISREG(a.st_mode)} == set(files)
    for path, entry in files.items():  # the attributes are the entry's
        attr = seen[path]
        assert (attr.st_size, attr.st_mtime_ns, attr.st_mode & 0o777) == (
            entry.original_size,
            entry.mtime_ns,
            entry.mode & 0o777,
        ), path
    counted_fast = [i for i in fast if i in {e.number for e in files.values()}]
    assert sorted(counted_fast) == sorted(e.number for e in files.values())  # each validated once


def test_directory_time_defaults_to_now_without_an_archive_time(tmp_path: Path) -> None:
    before = time.time_ns()
    fs = make_fs(tmp_path, "mixed")  # a root holding only directories
    assert before <= run(fs.getattr, ROOT_INO, CTX).st_mtime_ns <= time.time_ns()


def test_a_local_archive_is_dated_by_its_index_file(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    shutil.copytree(FIXTURES / "mixed", arc)
    os.utime(arc / "index.blob", ns=(ARCHIVE_TIME_NS, ARCHIVE_TIME_NS))
    assert open_directory(arc).created_ns == ARCHIVE_TIME_NS


def test_an_oci_layout_is_dated_by_its_manifest_else_its_index_json(tmp_path: Path) -> None:
    layout = make_oci_layout(FIXTURES / "mixed", tmp_path / "with")
    assert open_oci_layout(str(layout)).created_ns == 1_704_164_645_000_000_000  # 2024-01-02T03:04:05Z
    doc = json.loads((FIXTURES / "mixed" / "oci-manifest.json").read_bytes())
    del doc["annotations"]
    bare = make_oci_layout(FIXTURES / "mixed", tmp_path / "without", manifest=json.dumps(doc).encode())
    os.utime(bare / "index.json", ns=(ARCHIVE_TIME_NS, ARCHIVE_TIME_NS))
    assert open_oci_layout(str(bare)).created_ns == ARCHIVE_TIME_NS


class StalledSource:
    """The fixture's data blob behind a registry that has stopped answering until `resume()`:
    async only (no ``read_range_sync``), so the zstd decoder on its worker thread reads through
    ``trio.from_thread``, as it does from a registry."""

    def __init__(self, inner: LocalFileSource) -> None:
        self.inner = inner
        self.stalled = True
        self.calls = 0
        self._resumed: trio.Event | None = None  # made on the first read, inside trio.run

    @property
    def size(self) -> int:
        return self.inner.size

    def resume(self) -> None:
        self.stalled = False
        if self._resumed is not None:
            self._resumed.set()

    async def read_range(self, start: int, end: int, hint: ReadHint | None = None) -> bytes:
        self.calls += 1
        if self.stalled:
            if self._resumed is None:
                self._resumed = trio.Event()
            await self._resumed.wait()
        return await self.inner.read_range(start, end, hint)

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()


DEADLINE_S = 0.3  # the handlers' deadline in the tests below
DEADLINE_GUARD_S = 10.0  # hang guard: a handler past its deadline answers at once, not after this


def stalled_fs(tmp_path: Path, fixture: str) -> tuple[BlobFS, StalledSource]:
    archive = open_directory(FIXTURES / fixture)
    assert isinstance(archive.data, LocalFileSource)
    source = StalledSource(archive.data)
    return blob_fs(archive, tmp_path / "cache", data=source, deadline_s=DEADLINE_S), source


async def _answer(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> tuple[T | int, float]:
    """The handler's result or the errno it answered, and how long it took."""
    started = trio.current_time()
    try:
        result: T | int = await fn(*args)
    except pyfuse3.FUSEError as exc:
        result = exc.errno
    return result, trio.current_time() - started


@pytest.mark.expect_log("read: not served within")
def test_a_read_past_its_deadline_answers_eio_and_the_next_read_tries_afresh(tmp_path: Path) -> None:
    """A small file is fetched whole on its first read; with the source stalled the read answers EIO
    at its deadline (not whenever the source comes back), and the same handle reads right after."""
    fs, source = stalled_fs(tmp_path, "basic")
    ino = run(fs.lookup, ROOT_INO, b"top.md", CTX).st_ino
    want = tree_files("basic")[b"top.md"].data

    async def body() -> None:
        fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
        with trio.fail_after(DEADLINE_GUARD_S):
            first, took = await _answer(fs.read, fh, 0, 4096)
            assert first == errno.EIO
            assert took >= DEADLINE_S
            source.resume()
            second, _ = await _answer(fs.read, fh, 0, 4096)
        assert second == want[:4096]
        await fs.release(fh)

    run(body)
    assert source.calls >= 2


@pytest.mark.expect_log("open: not served within")
def test_an_open_decoding_on_a_thread_past_its_deadline_is_cancelled_cleanly(tmp_path: Path) -> None:
    """A large zstd file is decoded into the content store at open, on a worker thread that reads
    the source through trio: the deadline reaches into that thread, the open answers EIO at it, and
    a later open (the source back) decodes afresh and serves the right bytes; an open that waited
    on the cancelled one's fill is not failed by it."""
    fs, source = stalled_fs(tmp_path, "mixed")
    number = fs.view.find(b"d02-et/sub0/f007-zstd.md")
    assert number is not None
    entry = fs.view.entry(number)
    assert entry.compression == 1
    assert entry.original_size > 1 << 20  # decoded into the content store at open
    ino = FILE_INO_BASE + number

    async def body() -> None:
        with trio.fail_after(DEADLINE_GUARD_S):
            async with trio.open_nursery() as nursery:
                answers: list[object] = []

                async def one(delay_s: float) -> None:
                    await trio.sleep(delay_s)
                    answers.append((await _answer(fs.open, ino, os.O_RDONLY, CTX))[0])

                nursery.start_soon(one, 0.0)
                nursery.start_soon(one, DEADLINE_S / 2)  # joins the first one's fill, outlives it
            assert answers == [errno.EIO, errno.EIO]
            source.resume()
            info = await fs.open(ino, os.O_RDONLY, CTX)
            data = await fs.read(info.fh, 0, entry.original_size + 1)
            await fs.release(info.fh)
        assert hashlib.sha256(data).digest() == entry.hash

    run(body)
