"""Kernel-free twins of tests/fuse/test_hostile.py: the same hostile archive (tests/support/hostile.py),
from a local directory and from the session's real registry, asked of the handlers. Every bad entry
is isolated to its own name (not listed, or its own EIO with one log line), decompression bombs stop
at the entry's size, the good files are served; archives broken as a whole are refused before
anything is served, with the exit status a mount reports."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest

from blobmount.cache import CacheDir
from blobmount.errors import BlobmountError, InvalidArchive, exit_code_for
from blobmount.follow import index_view
from blobmount.fs import ROOT_INO
from blobmount.reader import ReaderConfig
from blobmount.sources import open_local
from tests.support.aio import run
from tests.support.handlers import CTX, inode_of, list_dir, read_file, serving
from tests.support.hostile import BAD, GOOD, UNREACHABLE, WHOLE, MiB, beyond_every_limit, build_hostile
from tests.support.mounts import push_dir
from tests.support.servers import Registry

# every line the hostile archive makes blobmount say (each is checked below, by name)
HOSTILE_LOG = (
    r"both a file and a directory|runs past the|exceeds 2\^63-1|decodes past original_size|original_size is"
    r"|corrupt zstd frame|sha256 mismatch|poisoned|'\.\.' component|empty path component|NUL byte"
    r"|exceeds 255|decodes to 1 bytes|in-memory limit"
)


@pytest.fixture(params=["dir", "registry"])
def hostile_source(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    arc = build_hostile(tmp_path / "hostile-archive")
    if request.param == "dir":
        return f"dir:{arc}"
    registry: Registry = request.getfixturevalue("registry")
    return push_dir(registry, arc, "twins/hostile")


@pytest.mark.expect_log(HOSTILE_LOG)
def test_hostile_entries_are_isolated(hostile_source: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"

    async def body() -> None:
        async with serving(hostile_source, cache) as s:
            fs = s.fs
            listing = {e.name.decode(errors="surrogateescape") for e in (await list_dir(fs, ROOT_INO))[2:]}
            for name, data in GOOD.items():  # good files: served, right bytes
                assert await read_file(fs, name) == data, name
            for name, (code, _) in BAD.items():  # bad files: their own errno, never ENOENT for an indexed name
                got = await read_file(fs, name)
                assert got == code, f"{name}: {got!r:.40}"
            # the unreachable entries are not listed; nothing looks like a path
            assert listing >= {"ok", "overlap-a.bin", "overlap-b.bin", "setuid.bin", "bomb-small.txt"}
            assert not any("/" in n or "\x00" in n or n in (".", "..") or len(n) > 255 for n in listing)
            for bad in ("escape", "abs", "conf", "past-blob.bin", "overflow.bin", "huge.txt"):
                assert bad not in listing
            attr = await fs.getattr(await inode_of(fs, "setuid.bin"), CTX)  # nine bits: no setuid/setgid
            assert stat.S_IMODE(attr.st_mode) == 0o777
            assert stat.S_ISREG(attr.st_mode)
            attr = await fs.getattr(await inode_of(fs, "max.txt"), CTX)  # listed with its size...
            assert attr.st_size == (1 << 63) - 1
            assert await read_file(fs, "max.txt") == errno.EIO  # ...too big for the cache and for memory

    run(body)
    lines = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.name.startswith("blobmount")]
    for name, (_, phrase) in BAD.items():
        assert [ln for ln in lines if phrase in ln and name in ln], f"{name}: no log line with {phrase!r}"
    for shown, phrase in UNREACHABLE:
        assert [ln for ln in lines if shown in ln and phrase in ln], f"{shown}: no {phrase!r}"
    assert "Traceback" not in caplog.text
    # the cache holds no bomb, and nothing but the cache's own layout
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in cached) < 16 * MiB, cached
    content = [p for p in cached if p.relative_to(cache).parts[0] == "content"]
    assert all(len(p.name) == 64 for p in content), content
    assert {p.relative_to(cache).parts[0] for p in cached} <= {"lock", "usage", "chunks", "content", "meta"}, cached


@pytest.mark.expect_log(r"'max\.txt': zstd frame decodes to 1 bytes|in-memory limit")
def test_a_file_beyond_every_limit_is_eio_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "arc"
    beyond_every_limit(out)

    async def body() -> None:
        async with serving(f"dir:{out}", tmp_path / "lazy") as s:
            assert await read_file(s.fs, "max.txt") == errno.EIO
        assert "'max.txt': zstd frame decodes to 1 bytes" in caplog.text
        caplog.clear()
        async with serving(f"dir:{out}", tmp_path / "strict", ReaderConfig(verify="strict")) as s:
            assert await read_file(s.fs, "max.txt") == errno.EIO
            assert await read_file(s.fs, "max.txt") == errno.EIO  # asked again: still one line
            assert await read_file(s.fs, "ok") == b"ok"

    run(body)
    lines = [r.getMessage() for r in caplog.records]
    lines = [ln for ln in lines if "max.txt" in ln and "cache" in ln and "in-memory limit" in ln]
    assert len(lines) == 1, caplog.text


@pytest.mark.parametrize("case", list(WHOLE))
def test_archives_broken_as_a_whole_are_refused_before_serving(case: str, tmp_path: Path) -> None:
    """What the mount's parent does before it forks (open the source, check the index: mount.py's
    prepare) refuses the archive with one line and the invalid-archive exit status 4, so no
    filesystem is ever built over it."""
    make, phrase = WHOLE[case]
    out = tmp_path / "arc"
    out.mkdir()
    make(out)
    with pytest.raises(BlobmountError) as info:
        index_view(open_local(f"dir:{out}"), CacheDir(tmp_path / "cache"))
    assert isinstance(info.value, InvalidArchive)
    assert phrase in str(info.value)
    assert "\n" not in str(info.value)
    assert exit_code_for(info.value) == 4
