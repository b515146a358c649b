"""Every writer of the cache names its temp files one way and reads "the disk will not take this"
from one errno set (cache/space.py): a decoded file and a chunk fall back alike."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from blobmount.cache import CacheDir, ChunkStore, ContentStore
from blobmount.cache.content import StoreUnavailable
from blobmount.cache.space import DISK_ERRNOS, is_disk_trouble, temp_path
from blobmount.errors import SourceError


def test_temp_files_sit_beside_their_final_name_and_never_repeat(tmp_path: Path) -> None:
    final = tmp_path / "chunks" / "ab" / "12"
    a, b = temp_path(final), temp_path(final)
    assert a != b
    assert a.parent == final.parent
    assert a.name.startswith("12.")
    assert a.suffix == ".tmp"


@pytest.mark.parametrize("code", sorted(DISK_ERRNOS))
def test_a_decoded_file_the_disk_refuses_is_served_without_the_store(tmp_path: Path, code: int) -> None:
    """EIO and EPERM were once failures here and a fallback for chunks; now one set decides."""
    store = ContentStore(CacheDir(tmp_path / "cache"))

    def produce(tmp: Path) -> None:
        raise OSError(code, errno.errorcode[code])

    with pytest.raises(StoreUnavailable):
        trio.run(store.fill, "ab" * 32, 100, produce)


def test_any_other_oserror_stays_a_failure(tmp_path: Path) -> None:
    store = ContentStore(CacheDir(tmp_path / "cache"))

    def produce(tmp: Path) -> None:
        raise OSError(errno.EBADF, "bug")

    with pytest.raises(SourceError) as info:
        trio.run(store.fill, "cd" * 32, 100, produce)
    assert not isinstance(info.value, StoreUnavailable)
    assert not is_disk_trouble(OSError(errno.EBADF, "bug"))


@pytest.mark.parametrize("code", [errno.EIO, errno.EPERM, errno.ENOSPC])
@pytest.mark.expect_log("chunk cache: cannot write .*serving from memory")
def test_a_chunk_the_disk_refuses_stays_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    chunks = ChunkStore(CacheDir(tmp_path / "cache"), "ef" * 32, 1 << 20, chunk_size=4096)
    real_open = open

    def refusing_open(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if str(path).endswith(".tmp"):
            raise OSError(code, errno.errorcode[code])
        return real_open(path, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", refusing_open)
    assert chunks.store(0, b"x" * 4096) is False
    assert not list((tmp_path / "cache").rglob("*.tmp"))
