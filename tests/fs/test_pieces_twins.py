"""Kernel-free twins of tests/fuse/test_random_reads.py and test_cache_compat.py: the same archives
on the same registry behind the same proxies, read through the handlers as the kernel would ask
(one open, reads of the sizes it sends, a release)."""

from __future__ import annotations

import errno
import os
import tarfile
from pathlib import Path

import pytest
import trio

from blobmount.fs import BlobFS
from blobmount.pieces import PIECE_BYTES
from blobmount.registry.client import RegistryOptions
from tests.support.aio import run
from tests.support.faults import Fault, FaultProxy, Kind, blob
from tests.support.handlers import CTX, inode_of, read_file, serving
from tests.support.helpers import tree_files
from tests.support.pieces import BIG, MIB, SMALL, Pushed, blob_ranges, far_offsets, piece_requests, push_random_archive
from tests.support.servers import QuirkProxy, Registry

OLD_CACHE = Path(__file__).resolve().parents[1] / "fixtures" / "cache-v1" / "mixed.tar.gz"
MIXED_DATA_SIZE = 4765703
KEPT = (0, 4)
OPTIONS = RegistryOptions(timeout_s=30.0)


@pytest.fixture(scope="module")
def archive(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    src, out = tmp_path_factory.mktemp("pieces-src"), tmp_path_factory.mktemp("pieces-archive")
    return push_random_archive(registry, src, out)


async def _preads(fs: BlobFS, path: str, offsets: list[int], want: bytes) -> None:
    fh = (await fs.open(await inode_of(fs, path), os.O_RDONLY, CTX)).fh
    try:
        for off in offsets:
            assert await fs.read(fh, off, 4096) == want[off : off + 4096], off
    finally:
        await fs.release(fh)


def test_random_4k_reads_fetch_pieces_and_a_remount_fetches_nothing(
    archive: Pushed, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    ref = f"{quirk_proxy.host}/{archive.repo}:v1"
    offsets = far_offsets(60, BIG)
    big = archive.files["a/big.bin"]

    async def once() -> None:
        async with serving(ref, tmp_path / "cache", options=OPTIONS) as s:
            await _preads(s.fs, "a/big.bin", offsets, big)
            await trio.sleep(0.3)  # the pieces' writes land

    quirk_proxy.state.seen.clear()
    run(once)
    fetched = blob_ranges(quirk_proxy)
    assert fetched
    assert [r for r in fetched if r[1] - r[0] > 2 * PIECE_BYTES] == [], fetched
    assert sum(b - a for a, b in fetched) <= 16 * 4096 * len(offsets)
    quirk_proxy.state.seen.clear()
    run(once)
    assert blob_ranges(quirk_proxy) == []


def test_a_stream_and_a_read_that_continues_after_a_jump_keep_whole_chunks(
    archive: Pushed, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    ref = f"{quirk_proxy.host}/{archive.repo}:v1"
    big = archive.files["a/big.bin"]

    async def body() -> None:
        async with serving(ref, tmp_path / "cache", options=OPTIONS) as s:
            quirk_proxy.state.seen.clear()
            assert await read_file(s.fs, "b/stream.bin") == archive.files["b/stream.bin"]
            stream = blob_ranges(quirk_proxy)
            assert stream
            assert piece_requests(stream) == []
            quirk_proxy.state.seen.clear()
            start = 9 * MIB + 12288
            assert await read_file(s.fs, "a/big.bin", start, 4096) == big[start : start + 4096]
            fh = (await s.fs.open(await inode_of(s.fs, "a/big.bin"), os.O_RDONLY, CTX)).fh
            try:
                await s.fs.read(fh, start, 4096)  # the jump, then in order from there
                pos = start + 4096
                for _ in range(24):
                    assert await s.fs.read(fh, pos, 128 << 10) == big[pos : pos + (128 << 10)]
                    pos += 128 << 10
            finally:
                await s.fs.release(fh)
            after = blob_ranges(quirk_proxy)
            assert after[0][1] - after[0][0] <= 2 * PIECE_BYTES
            assert any(b - a >= MIB for a, b in after[1:]), after

    run(body)


def test_small_files_and_first_reads_at_the_start_stay_on_chunks(
    archive: Pushed, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    ref = f"{quirk_proxy.host}/{archive.repo}:v1"

    async def body() -> None:
        async with serving(ref, tmp_path / "cache", options=OPTIONS) as s:
            quirk_proxy.state.seen.clear()
            assert await read_file(s.fs, "b/stream.bin", 0, 4096) == archive.files["b/stream.bin"][:4096]
            assert await read_file(s.fs, "0/small.txt") == archive.files["0/small.txt"]
            fetched = blob_ranges(quirk_proxy)
            assert fetched
            assert piece_requests(fetched) == []

    run(body)


@pytest.mark.expect_log(r"a piece served earlier differs")
def test_a_flipped_piece_fails_the_whole_read_then_the_file_reads_right(
    archive: Pushed, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """The daemon's half: without a kernel the whole read asks for every byte, the chunks bring
    the right ones and hash right, and the piece served earlier disagrees with them: the read
    that completes the file fails (EIO) all the same; the next read is right; the pieces go."""
    ref = f"{fault_proxy.host}/{archive.repo}:v1"
    big = archive.files["a/big.bin"]
    off = 7 * MIB + 40960
    at = SMALL + off + 100
    fault = fault_proxy.add(Fault(Kind.FLIP, blob(archive.data_digest, at, at + 1), times=1, at=at))
    cache = tmp_path / "cache"

    async def body() -> None:
        async with serving(ref, cache, options=OPTIONS) as s:
            first = await read_file(s.fs, "a/big.bin", off, 4096)
            assert fault.hits == 1
            assert first != big[off : off + 4096]
            assert await read_file(s.fs, "a/big.bin") == errno.EIO
            assert await read_file(s.fs, "a/big.bin") == big
            assert await read_file(s.fs, "a/big.bin", off, 4096) == big[off : off + 4096]

    run(body)
    assert not [p for p in cache.glob(f"chunks/*-{PIECE_BYTES}/*") if p.name.isdigit()]


def _old_cache(dest: Path) -> Path:
    with tarfile.open(OLD_CACHE) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _mixed_via(pushed: dict[str, str], proxy_host: str) -> str:
    ref = pushed["mixed@"]
    return ref.replace(ref.split("/", 1)[0], proxy_host, 1)


def test_a_cache_written_by_the_previous_release_serves_its_chunks(
    pushed: dict[str, str], quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    cache = _old_cache(tmp_path / "cache")
    files = tree_files("mixed")

    async def body() -> None:
        async with serving(_mixed_via(pushed, quirk_proxy.host), cache, options=OPTIONS) as s:
            for rel, want in files.items():
                assert await read_file(s.fs, rel) == want.data, rel

    run(body)
    fetched = blob_ranges(quirk_proxy)
    kept = [(i * MIB, min((i + 1) * MIB, MIXED_DATA_SIZE)) for i in KEPT]
    for start, end in fetched:
        assert all(end <= a or start >= b for a, b in kept), (start, end)
    assert sum(b - a for a, b in fetched) == MIXED_DATA_SIZE - sum(b - a for a, b in kept)


@pytest.mark.expect_log(r"chunk cache: .* failed its checksum or length")
def test_an_old_chunk_that_fails_its_trailer_is_refetched_never_served(
    pushed: dict[str, str], quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    cache = _old_cache(tmp_path / "cache")
    (chunk0,) = cache.glob("chunks/*-1048576/0")
    raw = bytearray(chunk0.read_bytes())
    raw[1000] ^= 0x01
    chunk0.write_bytes(bytes(raw))
    files = tree_files("mixed")

    async def body() -> None:
        async with serving(_mixed_via(pushed, quirk_proxy.host), cache, options=OPTIONS) as s:
            for rel, want in files.items():
                assert await read_file(s.fs, rel) == want.data, rel

    run(body)
    assert any(start < MIB for start, _end in blob_ranges(quirk_proxy))
