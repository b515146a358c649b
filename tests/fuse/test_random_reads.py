"""Random reads fetch 32 KiB pieces, not 1 MiB chunks (blobmount/pieces.py), against the real
registry, counted at a proxy in front of it; streams and whole files keep the chunk path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from blobmount.pieces import PIECE_BYTES
from tests.support.faults import Fault, FaultProxy, Kind, blob
from tests.support.mounts import mounted
from tests.support.pieces import BIG, MIB, SMALL, Pushed, far_offsets, piece_requests, push_random_archive
from tests.support.pieces import blob_ranges as _ranges
from tests.support.servers import QuirkProxy, Registry

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def archive(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    return push_random_archive(
        registry, tmp_path_factory.mktemp("random-src"), tmp_path_factory.mktemp("random-archive")
    )


def _random_reads(path: Path, offsets: list[int], want: bytes) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            assert os.pread(fd, 4096, off) == want[off : off + 4096], off
    finally:
        os.close(fd)
    return 4096 * len(offsets)


def test_random_4k_reads_fetch_pieces_and_a_remount_fetches_nothing(
    archive: Pushed, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    ref = f"{quirk_proxy.host}/{archive.repo}:v1"
    offsets = far_offsets(60, BIG)
    cache = tmp_path / "cache"
    with mounted(ref, tmp_path / "mnt", "--timeout", "30", cache_dir=cache) as m:
        quirk_proxy.state.seen.clear()
        read = _random_reads(m.path / "a/big.bin", offsets, archive.files["a/big.bin"])
    fetched = _ranges(quirk_proxy)
    assert fetched
    # a piece, or two where a read straddles their boundary (a file starts anywhere in the blob)
    assert [r for r in fetched if r[1] - r[0] > 2 * PIECE_BYTES] == [], fetched
    assert sum(end - start for start, end in fetched) <= 16 * read
    quirk_proxy.state.seen.clear()
    with mounted(ref, tmp_path / "mnt", "--timeout", "30", cache_dir=cache) as m:
        _random_reads(m.path / "a/big.bin", offsets, archive.files["a/big.bin"])
    assert _ranges(quirk_proxy) == []  # the pieces were kept on disk


def test_a_stream_and_a_read_that_continues_after_a_jump_keep_whole_chunks(
    archive: Pushed, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    ref = f"{quirk_proxy.host}/{archive.repo}:v1"
    with mounted(ref, tmp_path / "mnt", "--timeout", "30") as m:
        quirk_proxy.state.seen.clear()
        assert (m.path / "b/stream.bin").read_bytes() == archive.files["b/stream.bin"]
        stream = _ranges(quirk_proxy)
        assert stream
        assert sum(end - start for start, end in stream) <= 4 * MIB + 2 * MIB  # each byte about once
        assert piece_requests(stream) == []  # no piece on a stream
        quirk_proxy.state.seen.clear()
        big = archive.files["a/big.bin"]
        with open(m.path / "a/big.bin", "rb", buffering=0) as f:
            f.seek(9 * MIB + 12288)  # a jump: one piece
            assert f.read(4096) == big[9 * MIB + 12288 : 9 * MIB + 16384]
            data = f.read(3 * MIB)  # then in order: chunks, with read-ahead
            assert data == big[9 * MIB + 16384 : 12 * MIB + 16384]
        after = _ranges(quirk_proxy)
        assert after[0][1] - after[0][0] <= PIECE_BYTES
        assert any(end - start >= MIB for start, end in after[1:]), after


def test_small_files_and_first_reads_at_the_start_stay_on_chunks(
    archive: Pushed, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    ref = f"{quirk_proxy.host}/{archive.repo}:v1"
    with mounted(ref, tmp_path / "mnt", "--timeout", "30") as m:
        quirk_proxy.state.seen.clear()
        with open(m.path / "b/stream.bin", "rb", buffering=0) as f:
            assert f.read(4096) == archive.files["b/stream.bin"][:4096]
        assert (m.path / "0/small.txt").read_bytes() == archive.files["0/small.txt"]
        fetched = _ranges(quirk_proxy)
        assert fetched
        assert piece_requests(fetched) == []


def test_a_flipped_piece_fails_the_whole_read_then_the_file_reads_right(
    archive: Pushed, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Lazy semantics: a random read of a file not yet verified may get a flipped bit (as from a
    chunk). The kernel keeps that page, and a later read of the whole file gets it from there
    without asking: that read must fail, though the chunks it hashed are right; the next read of
    the file is right, and the piece that carried the flip is gone."""
    ref = f"{fault_proxy.host}/{archive.repo}:v1"
    big = archive.files["a/big.bin"]
    off = 7 * MIB + 40960
    at = SMALL + off + 100  # the blob offset of a byte the 4 KiB read returns
    fault = fault_proxy.add(Fault(Kind.FLIP, blob(archive.data_digest, at, at + 1), times=1, at=at))
    cache = tmp_path / "cache"
    with mounted(ref, tmp_path / "mnt", "--timeout", "30", cache_dir=cache) as m:
        path = m.path / "a/big.bin"
        with open(path, "rb", buffering=0) as f:
            f.seek(off)
            first = f.read(4096)
        assert fault.hits == 1
        assert first != big[off : off + 4096]  # served unverified, as lazily verified files are
        with pytest.raises(OSError) as failed:
            path.read_bytes()
        assert failed.value.errno == errno.EIO
        assert path.read_bytes() == big
        with open(path, "rb", buffering=0) as f:
            f.seek(off)
            assert f.read(4096) == big[off : off + 4096]
    assert not [p for p in cache.glob(f"chunks/*-{PIECE_BYTES}/*") if p.name.isdigit()]
