"""Kernel-free twins of the mounted tree tests (tests/fuse/test_mounted.py, test_bigdir.py,
test_security.py, the directory times of test_real_programs.py, the request counts of
test_introspect.py): the same archives, the same sources (a local directory, an OCI layout, the
session's real registry), the same checks, asked of the handlers as the kernel asks them
(tests/support/handlers.py). tests/fs/TWINS.md pairs each with its mounted test."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
import trio

from blobmount.create import CreateOptions, create_archive
from blobmount.daemon import metrics
from blobmount.fs import ROOT_INO, BlobFS
from blobmount.index import EntryRecord, IndexView, build_index
from blobmount.reader import ReaderConfig
from tests.support.aio import run
from tests.support.corpus import Spec, write_archive
from tests.support.daemon import samples
from tests.support.handlers import (
    CTX,
    answer,
    inode_of,
    list_dir,
    read_file,
    read_handle,
    readdir_once,
    serving,
)
from tests.support.helpers import FIXTURE_NAMES, FIXTURES, tree_files
from tests.support.mountedtree import (
    RANDOM_READERS,
    SOURCES,
    SourceFor,
    flip,
    random_read_archive,
    random_reads,
    source_maker,
    tampered_archive,
)


@pytest.fixture(params=SOURCES)
def source_for(request: pytest.FixtureRequest, tmp_path: Path) -> SourceFor:
    """An archive directory as a SOURCE string of the parametrized kind (test_mounted.py's)."""
    return source_maker(request, tmp_path, "twins")


async def _walk(fs: BlobFS, ino: int, path: bytes, parent: int, out: dict[bytes, pyfuse3.EntryAttributes]) -> None:
    """Every file under `ino`, by path, as readdir lists it; each directory's `.`, `..` and link
    count checked on the way (what os.walk and stat see of a mount)."""
    listed = await list_dir(fs, ino)
    names = [e.name for e in listed]
    assert names[:2] == [b".", b".."], path
    assert listed[0].attr.st_ino == ino
    assert listed[1].attr.st_ino == parent, path
    subdirs = [e for e in listed[2:] if stat.S_ISDIR(e.attr.st_mode)]
    attr = await fs.getattr(ino, CTX)
    assert stat.S_ISDIR(attr.st_mode)
    assert attr.st_nlink == 2 + len(subdirs), path
    assert (await fs.lookup(ino, b"..", CTX)).st_ino == parent
    for e in listed[2:]:
        rel = path + b"/" + e.name if path else e.name
        assert (await fs.lookup(ino, e.name, CTX)).st_ino == e.attr.st_ino, rel  # readdirplus agrees
        if stat.S_ISDIR(e.attr.st_mode):
            await _walk(fs, e.attr.st_ino, rel, ino, out)
        else:
            out[rel] = e.attr


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tree_through_the_handlers_equals_the_source_tree(name: str, source_for: SourceFor, tmp_path: Path) -> None:
    files = tree_files(name)
    source = source_for(FIXTURES / name)

    async def body() -> None:
        async with serving(source, tmp_path / "cache") as s:
            seen: dict[bytes, pyfuse3.EntryAttributes] = {}
            await _walk(s.fs, ROOT_INO, b"", ROOT_INO, seen)
            assert set(seen) == set(files)
            for rel, attr in seen.items():
                want = files[rel]
                assert stat.S_ISREG(attr.st_mode)
                assert stat.S_IMODE(attr.st_mode) == want.mode, rel
                assert (attr.st_uid, attr.st_gid) == (want.uid, want.gid), rel
                assert attr.st_mtime_ns == want.mtime_ns, rel
                assert attr.st_size == len(want.data), rel
                assert await read_file(s.fs, rel) == want.data, rel

    run(body)


def test_concurrent_random_reads_match(source_for: SourceFor, tmp_path: Path) -> None:
    archive, files = random_read_archive(tmp_path)
    source = source_for(archive)
    wrong: list[str] = []

    async def body() -> None:
        async with serving(source, tmp_path / "cache") as s:
            fs = s.fs

            async def worker(seed: int) -> None:
                fhs = {n: (await fs.open(await inode_of(fs, n), os.O_RDONLY, CTX)).fh for n in files}
                try:
                    for n, off, size in random_reads(seed, files):
                        got = await read_handle(fs, fhs[n], off, size)
                        if got != files[n][off : off + size]:
                            wrong.append(f"{n} {off}+{size}: {got if isinstance(got, int) else len(got)}")
                finally:
                    for fh in fhs.values():
                        await fs.release(fh)

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for i in range(RANDOM_READERS):
                        nursery.start_soon(worker, i)

    run(body)
    assert wrong == []


WRITES: dict[str, Callable[[BlobFS, int, int], tuple[Callable[..., object], tuple[object, ...]]]] = {
    # what each refused call of test_mounted.py (and the rest of the write table) sends the daemon
    "open r+b": lambda fs, f, d: (fs.open, (f, os.O_RDWR, CTX)),
    "open wb (create)": lambda fs, f, d: (fs.create, (ROOT_INO, b"new", 0o644, os.O_WRONLY | os.O_CREAT, CTX)),
    "mkdir": lambda fs, f, d: (fs.mkdir, (ROOT_INO, b"dir", 0o755, CTX)),
    "unlink": lambda fs, f, d: (fs.unlink, (d, b"x", CTX)),
    "rmdir": lambda fs, f, d: (fs.rmdir, (ROOT_INO, b"d", CTX)),
    "rename": lambda fs, f, d: (fs.rename, (d, b"x", ROOT_INO, b"x", 0, CTX)),
    "chmod (setattr)": lambda fs, f, d: (
        fs.setattr,
        (f, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, CTX),
    ),
    "truncate (setattr)": lambda fs, f, d: (
        fs.setattr,
        (f, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), 1, CTX),
    ),
    "setxattr": lambda fs, f, d: (fs.setxattr, (f, b"user.x", b"1", CTX)),
    "removexattr": lambda fs, f, d: (fs.removexattr, (f, b"user.x", CTX)),
    "symlink": lambda fs, f, d: (fs.symlink, (ROOT_INO, b"l", b"t", CTX)),
    "link": lambda fs, f, d: (fs.link, (f, ROOT_INO, b"h", CTX)),
    "mknod": lambda fs, f, d: (fs.mknod, (ROOT_INO, b"n", stat.S_IFIFO | 0o644, 0, CTX)),
    "write": lambda fs, f, d: (fs.write, (1, 0, b"x")),
    "open O_TRUNC": lambda fs, f, d: (fs.open, (f, os.O_RDONLY | os.O_TRUNC, CTX)),
    "access W_OK": lambda fs, f, d: (fs.access, (f, os.W_OK, CTX)),
}


def test_writes_fail_with_erofs_and_xattrs_describe_files(source_for: SourceFor, tmp_path: Path) -> None:
    view = IndexView((FIXTURES / "mixed" / "index.blob").read_bytes())
    zstd = next(view.entry(i) for i in range(len(view)) if view.entry(i).compression == 1)
    raw = next(view.entry(i) for i in range(len(view)) if view.entry(i).compression == 0 and view.entry(i).data_size)
    source = source_for(FIXTURES / "mixed")

    async def body() -> None:
        async with serving(source, tmp_path / "cache") as s:
            fs = s.fs
            zino, rino = await inode_of(fs, zstd.path), await inode_of(fs, raw.path)
            parent = await inode_of(fs, zstd.path.rpartition(b"/")[0])
            for what, call in WRITES.items():
                fn, args = call(fs, zino, parent)
                assert await answer(fn, *args) == errno.EROFS, what  # type: ignore[arg-type]
            assert await fs.listxattr(zino, CTX) == []  # readable by name only: copies must not carry them
            assert await fs.getxattr(zino, b"user.blobmount.sha256", CTX) == zstd.hash.hex().encode()
            assert await fs.getxattr(zino, b"user.blobmount.compression", CTX) == b"zstd"
            assert await fs.getxattr(rino, b"user.blobmount.compression", CTX) == b"none"
            assert await fs.getxattr(zino, b"user.blobmount.stored_size", CTX) == str(zstd.data_size).encode()
            assert await answer(fs.getxattr, zino, b"user.nope", CTX) == errno.ENODATA
            assert await fs.getxattr(rino, b"user.blobmount.verified", CTX) == b"unverified"
            data = await read_file(fs, raw.path)
            assert isinstance(data, bytes)
            assert hashlib.sha256(data).digest() == raw.hash
            assert await fs.getxattr(rino, b"user.blobmount.verified", CTX) == b"verified"
            assert await answer(fs.lookup, ROOT_INO, b"no-such-file", CTX) == errno.ENOENT
            assert await answer(fs.open, ROOT_INO, os.O_RDONLY, CTX) == errno.EISDIR
            assert (await fs.statfs(CTX)).f_files == len(view)

    run(body)


# -- integrity ------------------------------------------------------------------------------------


@pytest.mark.expect_log(r"sha256 mismatch|corrupt zstd frame|poisoned")
@pytest.mark.parametrize("name", [b"small.jpg", b"text.txt"])
def test_tampered_file_is_eio_and_the_rest_is_served(
    name: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive, contents = tampered_archive(tmp_path, big=False)
    expected, actual = flip(archive, name)

    async def body() -> None:
        async with serving(f"dir:{archive}", tmp_path / "cache") as s:
            assert await read_file(s.fs, name) == errno.EIO
            assert await read_file(s.fs, "other.txt") == contents["other.txt"]
            assert await read_file(s.fs, name) == errno.EIO
            assert await s.fs.getxattr(await inode_of(s.fs, name), b"user.blobmount.verified", CTX) == b"poisoned"

    run(body)
    lines = [r.getMessage() for r in caplog.records if expected in r.getMessage()]
    assert len(lines) == 1, caplog.text
    if name == b"small.jpg":  # raw: the actual hash of the stored bytes is known to the test
        assert actual in lines[0]
    assert os.fsdecode(name) in lines[0]


@pytest.mark.expect_log(r"sha256 mismatch|poisoned")
def test_large_tampered_file_lazy_head_then_eof_then_head_again(tmp_path: Path) -> None:
    archive, contents = tampered_archive(tmp_path)
    flip(archive, b"big.jpg", 0.9)

    async def body() -> None:
        async with serving(f"dir:{archive}", tmp_path / "cache") as s:
            fs = s.fs
            fh = (await fs.open(await inode_of(fs, "big.jpg"), os.O_RDONLY, CTX)).fh
            assert await fs.read(fh, 0, 65536) == contents["big.jpg"][:65536]  # served before verification
            assert await read_handle(fs, fh, 65536) == errno.EIO  # on to the end: the mismatch
            await fs.release(fh)
            assert await read_file(fs, "big.jpg", 0, 65536) == errno.EIO
            assert await read_file(fs, "other.txt") == contents["other.txt"]

    run(body)


@pytest.mark.expect_log(r"sha256 mismatch|poisoned")
def test_strict_policy_serves_nothing_of_a_bad_file(tmp_path: Path) -> None:
    archive, _ = tampered_archive(tmp_path)
    flip(archive, b"big.jpg", 0.9)

    async def body() -> None:
        async with serving(f"dir:{archive}", tmp_path / "cache", ReaderConfig(verify="strict")) as s:
            assert await read_file(s.fs, "big.jpg", 0, 4096) == errno.EIO

    run(body)


def test_opens_let_the_kernel_keep_pages(tmp_path: Path) -> None:
    """The daemon's half of test_kernel_keeps_pages_across_opens: every open of an immutable,
    trusted file says keep_cache (that the kernel then answers from its pages is its own part)."""
    archive, contents = tampered_archive(tmp_path, big=False)

    async def body() -> None:
        async with serving(f"dir:{archive}", tmp_path / "cache") as s:
            ino = await inode_of(s.fs, "other.txt")
            for _ in range(2):
                info = await s.fs.open(ino, os.O_RDONLY, CTX)
                assert info.keep_cache
                assert await read_handle(s.fs, info.fh) == contents["other.txt"]
                await s.fs.release(info.fh)

    run(body)


def test_owner_overrides_and_owner_self(tmp_path: Path) -> None:
    async def body() -> None:
        basic = f"dir:{FIXTURES / 'basic'}"
        async with serving(basic, tmp_path / "c1", uid=1234, gid=4321) as s:
            attr = await s.fs.getattr(await inode_of(s.fs, "top.md"), CTX)
            assert (attr.st_uid, attr.st_gid) == (1234, 4321)
        async with serving(basic, tmp_path / "c2", uid=os.getuid(), gid=os.getgid()) as s:  # --owner-self
            attr = await s.fs.getattr(await inode_of(s.fs, "a"), CTX)
            assert (attr.st_uid, attr.st_gid) == (os.getuid(), os.getgid())

    run(body)


# -- a directory of 100,000 entries ---------------------------------------------------------------

EMPTY = hashlib.sha256(b"").digest()
COUNT = 100_000
ROOM = 64  # entries per readdir request: about what the kernel's one-page buffer holds


def test_readdir_of_100k_entries_lists_each_name_once(tmp_path: Path) -> None:
    names = [b"f-%06d.txt" % i for i in range(COUNT)]
    paths = [b"big/" + n for n in names] + [b"big-sibling", b"big.txt", b"zz/inner/x"]
    out = tmp_path / "arc"
    out.mkdir()
    records = [EntryRecord(p, 0, 0, 0, EMPTY, 0o644, 0, 0, 0, 0) for p in sorted(paths)]
    (out / "index.blob").write_bytes(build_index(records, 0, hashlib.sha256(b"").digest()))
    (out / "data.blob").write_bytes(b"")

    async def body() -> None:
        async with serving(f"dir:{out}", tmp_path / "cache") as s:
            fs = s.fs
            big = await inode_of(fs, "big")
            listed = await list_dir(fs, big, room=ROOM)  # some 1,600 requests, each resumed at an offset
            got = [e.name for e in listed]
            assert got[:2] == [b".", b".."]
            assert len(got) == COUNT + 2
            assert set(got[2:]) == set(names)
            # a request resumed at any offset given goes on right after that entry
            for k in (2, 777, COUNT // 2, COUNT + 1):
                fh = 0 if fs.skip_opendir else await fs.opendir(big, CTX)
                again = await readdir_once(fs, fh, big, listed[k - 1].next_id, room=3)
                assert [e.name for e in again] == got[k : k + 3], k
                if fh:
                    await fs.releasedir(fh)
            assert sorted(e.name for e in (await list_dir(fs, ROOT_INO))[2:]) == [
                b"big",
                b"big-sibling",
                b"big.txt",
                b"zz",
            ]
            assert (await fs.getattr(big, CTX)).st_nlink == 2
            assert (await fs.getattr(ROOT_INO, CTX)).st_nlink == 4  # root: big, zz
            assert (await fs.getattr(await inode_of(fs, "big/f-099999.txt"), CTX)).st_size == 0

    run(body)


# -- modes and owners -----------------------------------------------------------------------------


@pytest.mark.parametrize("owner", [(None, None), (0, 0), (1234, 4321)])
def test_no_file_gains_setuid_setgid_or_sticky(owner: tuple[int | None, int | None], tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    modes = {b"suid": 0o4755, b"sgid": 0o2755, b"sticky": 0o1777, b"all": 0o7777, b"typed": 0o104755}
    write_archive(arc, [Spec(name, b"#!/bin/sh\n", mode=mode) for name, mode in modes.items()])

    async def body() -> None:
        async with serving(f"dir:{arc}", tmp_path / "cache", uid=owner[0], gid=owner[1]) as s:
            for name, mode in modes.items():
                attr = await s.fs.getattr(await inode_of(s.fs, name), CTX)
                assert stat.S_ISREG(attr.st_mode), name
                assert attr.st_mode & 0o7000 == 0, (name, oct(attr.st_mode))
                assert stat.S_IMODE(attr.st_mode) == mode & 0o777, name

    run(body)


# -- directory times ------------------------------------------------------------------------------

CREATED_NS = 1_650_000_000_123_456_789
FILE_TIME_NS = 1_700_000_000_000_000_000


def test_a_local_archive_dates_file_less_directories_by_its_index(tmp_path: Path) -> None:
    """`dir:` sources have no manifest: a directory without files of its own takes index.blob's
    mtime (as opened by the mount's parent), one with files its newest file's."""
    nested = tmp_path / "nested"
    (nested / "only").mkdir(parents=True)
    (nested / "only" / "f.txt").write_text("x\n")
    os.utime(nested / "only" / "f.txt", ns=(FILE_TIME_NS, FILE_TIME_NS))
    create_archive(nested, tmp_path / "arc", CreateOptions())
    os.utime(tmp_path / "arc" / "index.blob", ns=(CREATED_NS, CREATED_NS))

    async def body() -> None:
        async with serving(f"dir:{tmp_path / 'arc'}", tmp_path / "cache") as s:
            root = await s.fs.getattr(ROOT_INO, CTX)
            assert (root.st_atime_ns, root.st_mtime_ns, root.st_ctime_ns) == (CREATED_NS,) * 3
            assert (await s.fs.getattr(await inode_of(s.fs, "only"), CTX)).st_mtime_ns == FILE_TIME_NS

    run(body)


# -- what the daemon counts -----------------------------------------------------------------------


def _counts() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(metrics.render())


def test_requests_errors_and_read_bytes_are_counted_per_handler(tmp_path: Path) -> None:
    """The metrics test_introspect.py reads from a mount's /metrics, counted by the one wrapper
    every handler goes through: a refused lookup is an ENOENT of op lookup; a read counts its
    bytes, its request and its duration."""
    data = tree_files("basic")[b"top.md"].data
    before = _counts()

    async def body() -> None:
        async with serving(f"dir:{FIXTURES / 'basic'}", tmp_path / "cache") as s:
            assert await read_file(s.fs, "top.md") == data
            assert await answer(s.fs.lookup, ROOT_INO, b"nope", CTX) == errno.ENOENT

    run(body)
    after = _counts()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("blobmount_fuse_errors_total", errno="ENOENT", op="lookup") == 1
    assert delta("blobmount_fuse_read_bytes_total") == len(data)
    reads = delta("blobmount_fuse_requests_total", op="read")
    assert reads >= 1
    assert delta("blobmount_fuse_request_duration_seconds_count", op="read") == reads
