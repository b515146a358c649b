"""The kernel's no-open / no-opendir mode through the handlers, without a kernel (the mounted twin is
tests/fuse/test_kernel_cache.py): when opens are answered ENOSYS, what a read of fh 0 does instead
(per-inode handles, the poisoned check at the first read), when real opens are kept (a lazily
verified file), and the extended attribute probes."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pyfuse3
import pytest
import trio

from blobmount import fs as fs_module
from blobmount.create import CreateOptions, create_archive
from blobmount.fs import FILE_INO_BASE, ROOT_INO, BlobFS
from blobmount.reader import Reader, ReaderConfig
from blobmount.sources.local import open_directory
from tests.support.aio import run
from tests.support.handlers import CTX, blob_fs, fuse_errno

MIB = 1 << 20


def _blob(seed: int, size: int) -> bytes:
    """Incompressible-ish bytes that differ per seed."""
    out = bytearray()
    while len(out) < size:
        out += hashlib.sha256(seed.to_bytes(8, "big") + len(out).to_bytes(8, "big")).digest()
    return bytes(out[:size])


FILES = {
    "a/one.txt": b"one\n" * 10,
    "a/two.txt": b"two\n" * 1000,
    "b/raw2m.bin": _blob(1, 2 * MIB),  # raw, above SMALL_DECODE_BYTES, below the threshold
    "b/text.c": b"int x;\n" * 400_000,  # zstd, 2.8 MB decoded: decoded into the store at first read
    "empty": b"",
}


def _fs(tmp: Path, files: dict[str, bytes] = FILES, config: ReaderConfig | None = None) -> BlobFS:
    src = tmp / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    create_archive(src, tmp / "arch", CreateOptions())
    return blob_fs(open_directory(tmp / "arch"), tmp / "store", config)


def _ino(fs: BlobFS, path: str) -> int:
    number = fs.view.find(path.encode())
    assert number is not None
    return FILE_INO_BASE + number


async def _read_all(fs: BlobFS, ino: int, size: int = 128 << 10) -> bytes:
    out, off = [], 0
    while block := await fs.read(0, off, size, inode=ino):
        out.append(block)
        off += len(block)
    return b"".join(out)


def test_opens_answer_enosys_once_no_file_is_verified_lazily(tmp_path: Path) -> None:
    fs = _fs(tmp_path)
    assert not fs.skip_open  # until the pass over the index says so, opens are real
    assert fs.skip_opendir
    run(fs.decide_opens)
    assert fs.skip_open
    assert fuse_errno(fs.open, _ino(fs, "a/one.txt"), os.O_RDONLY, CTX) == errno.ENOSYS
    assert fuse_errno(fs.opendir, ROOT_INO, CTX) == errno.ENOSYS
    assert fuse_errno(fs.flush, 0, _ino(fs, "a/one.txt")) == errno.ENOSYS
    assert fuse_errno(fs.open, ROOT_INO, os.O_RDONLY, CTX) == errno.EISDIR  # still checked first
    fs.follows = True  # --follow: a listing continues in the archive it began in, so opendir is real
    fh = run(fs.opendir, ROOT_INO, CTX)
    assert fh > 0
    run(fs.releasedir, fh)


def test_a_lazily_verified_file_keeps_real_opens(tmp_path: Path) -> None:
    """Above --verify-threshold a raw file is served as read: a handle opened before a mismatch
    must fail, which needs opens (Trust first wins over the lever)."""
    fs = _fs(tmp_path, config=ReaderConfig(verify_threshold=1 * MIB))
    run(fs.decide_opens)
    assert not fs.skip_open
    info = run(fs.open, _ino(fs, "b/raw2m.bin"), os.O_RDONLY, CTX)
    assert info.fh > 0
    assert run(fs.read, info.fh, 0, 4) == FILES["b/raw2m.bin"][:4]
    run(fs.release, info.fh)
    strict = _fs(tmp_path / "strict", config=ReaderConfig(verify="strict", verify_threshold=1 * MIB))
    run(strict.decide_opens)
    assert strict.skip_open  # strict verifies every file before its first byte


def test_reads_of_fh_0_are_served_by_inode(tmp_path: Path) -> None:
    fs = _fs(tmp_path)
    run(fs.decide_opens)
    for path, data in FILES.items():
        got = run(_read_all, fs, _ino(fs, path))
        assert got == data, path
    # a range in the middle, and past the end
    ino = _ino(fs, "b/raw2m.bin")
    assert run(fs.read, 0, MIB + 5, 100, ino) == FILES["b/raw2m.bin"][MIB + 5 : MIB + 105]
    assert run(fs.read, 0, 3 * MIB, 100, ino) == b""
    assert run(fs.getxattr, ino, b"user.blobmount.verified", CTX) == b"verified"
    assert fuse_errno(fs.read, 0, 0, 10, ROOT_INO) == errno.EISDIR


def test_concurrent_first_reads_share_one_open_and_idle_handles_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = _fs(tmp_path)
    run(fs.decide_opens)
    opens: list[bytes] = []
    real_open = Reader.open

    async def counting_open(self: Reader, entry: object) -> object:
        opens.append(entry.path)  # type: ignore[attr-defined]
        return await real_open(self, entry)  # type: ignore[arg-type]

    monkeypatch.setattr(Reader, "open", counting_open)
    ino = _ino(fs, "b/text.c")

    async def parallel() -> list[bytes]:
        got: list[bytes] = [b""] * 8

        async def one(i: int) -> None:
            got[i] = bytes(await fs.read(0, i * (128 << 10), 128 << 10, inode=ino))

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
        return got

    got = run(parallel)
    assert b"".join(got) == FILES["b/text.c"][: 8 * (128 << 10)]
    assert opens == [b"b/text.c"]  # the kernel's read-ahead sends several: one open (one decode)
    fs._inode_handles.limit = 2
    for path in ("a/one.txt", "a/two.txt", "b/raw2m.bin", "empty"):
        run(_read_all, fs, _ino(fs, path))
    assert len(fs._inode_handles) <= 2
    assert fs.current.handles == 0  # no read in flight holds the generation


@pytest.mark.expect_log(r"^blobmount\.reader: .*corrupt zstd frame")
def test_a_poisoned_file_fails_at_its_first_read_and_the_rest_is_served(tmp_path: Path) -> None:
    fs = _fs(tmp_path)
    entry = fs.view.entry(fs.view.find(b"a/two.txt") or 0)
    blob = tmp_path / "arch" / "data.blob"
    with open(blob, "r+b") as f:  # one stored byte flipped (zstd: a bad frame or a mismatch)
        f.seek(entry.data_offset + 7)
        byte = f.read(1)
        f.seek(entry.data_offset + 7)
        f.write(bytes([byte[0] ^ 0xFF]))
    run(fs.decide_opens)
    ino = _ino(fs, "a/two.txt")
    assert fuse_errno(fs.read, 0, 0, 4096, ino) == errno.EIO  # read twice (a fault?), then poisoned
    assert fuse_errno(fs.read, 0, 0, 4096, ino) == errno.EIO  # and it stays so, by inode too
    assert run(fs.getxattr, ino, b"user.blobmount.verified", CTX) == b"poisoned"
    assert run(_read_all, fs, _ino(fs, "a/one.txt")) == FILES["a/one.txt"]


def test_readdir_of_fh_0_lists_by_inode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = _fs(tmp_path)
    listed: list[bytes] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        listed.append(name)
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    run(fs.readdir, 0, 0, None, ROOT_INO)
    assert listed == [b".", b"..", b"a", b"b", b"empty"]
    assert fs.current.handles == 0  # nothing to release: the kernel sends no releasedir


def test_xattr_probes(tmp_path: Path) -> None:
    fs = _fs(tmp_path)
    ino = _ino(fs, "a/one.txt")
    assert not BlobFS.enable_acl  # no FUSE_POSIX_ACL: the ACL names are answered EOPNOTSUPP
    names = (b"security.selinux", b"security.capability", b"trusted.overlay.opaque", b"system.posix_acl_access")
    for name in (*names, b"system.posix_acl_default"):
        assert fuse_errno(fs.getxattr, ino, name, CTX) == errno.EOPNOTSUPP, name
        assert fuse_errno(fs.getxattr, ROOT_INO, name, CTX) == errno.EOPNOTSUPP, name
    for name in (b"user.other", b"system.nfs4_acl", b"user.blobmount.nope"):
        assert fuse_errno(fs.getxattr, ino, name, CTX) == errno.ENODATA, name
    digest = hashlib.sha256(FILES["a/one.txt"]).hexdigest().encode()
    assert run(fs.getxattr, ino, b"user.blobmount.sha256", CTX) == digest
    assert run(fs.getxattr, ROOT_INO, b"user.blobmount.digest", CTX).startswith(b"sha256:")


def test_an_unpatched_pyfuse3_keeps_every_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Operations.pass_inode a read of fh 0 could not say its file: opens stay real."""
    monkeypatch.setattr(fs_module, "PYFUSE3_PASSES_INODE", False)
    fs = _fs(tmp_path)
    run(fs.decide_opens)
    assert not fs.skip_open
    assert not fs.skip_opendir
    fh = run(fs.opendir, ROOT_INO, CTX)
    run(fs.releasedir, fh)
    info = run(fs.open, _ino(fs, "a/one.txt"), os.O_RDONLY, CTX)
    assert run(fs.read, info.fh, 0, 1 << 20) == FILES["a/one.txt"]
    run(fs.release, info.fh)
