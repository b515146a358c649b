"""Kernel-free twins of tests/fuse/test_zstd_stream.py (large zstd files served while they decode)
and of tests/fuse/test_request_timeout.py (every request answered within its bound while the
registry stalls): the same archives on the session's real registry, behind the same FaultProxy,
read through the handlers. Decodes are counted from the reader's one INFO line per decode, as the
mounted tests count them in the daemon's log."""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import random
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from blobmount.fs import ROOT_INO
from blobmount.reader import ReaderConfig
from blobmount.reference import Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support import load
from tests.support.aio import run
from tests.support.corpus import Placed, Spec, write_archive
from tests.support.faults import Fault, FaultProxy, Kind, blob
from tests.support.handlers import (
    CTX,
    Served,
    inode_of,
    list_dir,
    read_file,
    read_handle,
    serving,
    until,
    verified_state,
)
from tests.support.servers import Registry
from tests.support.zstdstream import DECODE_LINE, RANDOM_BYTES, TEXT_BYTES, text

MiB = 1 << 20
REPO = "twins/stream:v1"
TIMEOUT_S = 3.0
GUARD_S = 90.0
STREAM = ReaderConfig(verify_threshold=256 << 10, wait_s=TIMEOUT_S)  # --verify-threshold 256K --timeout 3
STREAM_LOG = (
    r"^blobmount\.(fetch|remote|registry(\.\w+)*|reader|fs|streaming|decode|cache(\.\w+)*): (?!unexpected error)"
)


@dataclass(frozen=True, slots=True)
class StreamArchive:
    placed: dict[bytes, Placed]
    data_digest: str


@pytest.fixture(scope="module")
def stream_archive(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> StreamArchive:
    """test_zstd_stream.py's archive: a 48 MiB text and 6 MiB of random bytes, zstd, between pads."""
    rng = random.Random(25)
    specs = [
        Spec(b"pad-0", bytes(2 * MiB)),
        Spec(b"text.txt", text(TEXT_BYTES, 1), zstd=True),
        Spec(b"pad-1", bytes(2 * MiB)),
        Spec(b"random.bin", rng.randbytes(RANDOM_BYTES), zstd=True),
        Spec(b"pad-2", bytes(2 * MiB)),
    ]
    out = tmp_path_factory.mktemp("stream-twin-archive")
    placed = write_archive(out, specs)
    assert placed[b"text.txt"].data_size > 8 * MiB  # more than one request's worth of frame
    trio.run(functools.partial(push_archive, out, Reference.parse(f"{registry.host}/{REPO}"), RegistryOptions()))
    return StreamArchive(placed, "sha256:" + hashlib.sha256((out / "data.blob").read_bytes()).hexdigest())


@pytest.fixture
def decodes(caplog: pytest.LogCaptureFixture) -> Any:
    """How many decodes of a file began (its INFO line), like the mounted test's ``_decodes``."""
    caplog.set_level(logging.INFO, logger="blobmount")
    return lambda name: sum(1 for r in caplog.records if f"'{name}': {DECODE_LINE}" in r.getMessage())


def _streaming(
    fault_proxy: FaultProxy, cache: Path, config: ReaderConfig = STREAM, **kw: Any
) -> AbstractAsyncContextManager[Served]:
    return serving(f"{fault_proxy.host}/{REPO}", cache, config, options=RegistryOptions(timeout_s=TIMEOUT_S), **kw)


def _data_ranges(fault_proxy: FaultProxy, arc: StreamArchive) -> list[tuple[int, int]]:
    out = []
    for method, path, headers in list(fault_proxy.state.seen):
        value = headers.get("range")
        if method == "GET" and value and arc.data_digest in path:
            first, last = (int(x) for x in value.removeprefix("bytes=").split("-"))
            if (first, last) != (0, 0):
                out.append((first, last + 1))
    return out


def _tmp_files(cache: Path) -> list[Path]:
    return list(cache.rglob("*.tmp"))


def _content_files(cache: Path) -> list[Path]:
    return [f for f in (cache / "content").rglob("*") if f.is_file() and not f.name.endswith(".tmp")]


async def _is_verified(s: Served, name: str) -> bool:
    return await verified_state(s.fs, name) == b"verified"


@pytest.mark.expect_log(STREAM_LOG)
def test_a_reader_ahead_of_the_decoder_waits_then_gets_right_bytes(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path, decodes: Any
) -> None:
    data = stream_archive.placed[b"text.txt"].data

    async def body() -> None:
        async with _streaming(fault_proxy, tmp_path / "cache") as s:
            assert await read_file(s.fs, "text.txt", 0, 4096) == data[:4096]
            assert await verified_state(s.fs, "text.txt") == b"unverified"  # served before the end was decoded
            at = TEXT_BYTES - 3 * MiB
            assert await read_file(s.fs, "text.txt", at, MiB) == data[at : at + MiB]
            assert await read_file(s.fs, "text.txt") == data
            await until(lambda: _is_verified(s, "text.txt"), "never verified")

    run(body)
    assert decodes("text.txt") == 1


@pytest.mark.expect_log(STREAM_LOG)
def test_a_file_decoded_into_the_store_leaves_its_frame_out_of_the_chunk_cache(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path, decodes: Any
) -> None:
    p = stream_archive.placed[b"text.txt"]
    cache = tmp_path / "cache"

    async def body() -> None:
        async with _streaming(fault_proxy, cache) as s:
            assert await read_file(s.fs, "text.txt") == p.data
            await until(lambda: _is_verified(s, "text.txt"), "never verified")

            async def stored() -> bool:
                return bool(_content_files(cache))

            await until(stored, "the verified file never reached the store")
            chunks = sum(f.stat().st_size for f in (cache / "chunks").rglob("*") if f.is_file())
            assert chunks < MiB, (chunks, p.data_size)  # the frame is more than 8 MiB
            assert await read_file(s.fs, "text.txt", 5 * MiB, MiB) == p.data[5 * MiB : 6 * MiB]

    run(body)
    assert decodes("text.txt") == 1  # later opens: from the store


@pytest.mark.expect_log(STREAM_LOG)
def test_a_reader_ahead_of_a_stalled_decode_fails_in_time_and_the_next_read_is_right(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path
) -> None:
    arc = stream_archive
    p = arc.placed[b"text.txt"]
    at = p.data_offset + p.data_size * 6 // 10
    far = TEXT_BYTES - 2 * MiB

    async def body() -> None:
        async with _streaming(fault_proxy, tmp_path / "cache") as s:
            stall = fault_proxy.add(Fault(Kind.STALL, blob(arc.data_digest, at, at + 1), stall_s=60.0))
            assert await read_file(s.fs, "text.txt", 0, MiB) == p.data[:MiB]
            with trio.fail_after(GUARD_S / 2):  # EIO after about --timeout, never a hang
                assert await read_file(s.fs, "text.txt", far, 4096) == errno.EIO
            assert stall.hits >= 1, "the stall was never met"
            fault_proxy.clear()

            async def right() -> bool:
                return await read_file(s.fs, "text.txt", far, 4096) == p.data[far : far + 4096]

            await until(right, "never right", GUARD_S)

    run(body)


@pytest.mark.expect_log(STREAM_LOG)
def test_two_readers_at_different_offsets_share_one_decode(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path, decodes: Any
) -> None:
    arc = stream_archive
    p = arc.placed[b"text.txt"]
    half = TEXT_BYTES // 2
    results: dict[str, bytes | int] = {}

    async def body() -> None:
        async with _streaming(fault_proxy, tmp_path / "cache") as s:
            fault_proxy.state.seen.clear()

            async def one(name: str, offset: int, size: int | None) -> None:
                results[name] = await read_file(s.fs, "text.txt", offset, size)

            with trio.fail_after(GUARD_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(one, "head", 0, None)
                    nursery.start_soon(one, "middle", half, 8 * MiB)
            await until(lambda: _is_verified(s, "text.txt"), "never verified")

    run(body)
    assert results["head"] == p.data
    assert results["middle"] == p.data[half : half + 8 * MiB]
    assert decodes("text.txt") == 1
    fetched = sum(b - a for a, b in _data_ranges(fault_proxy, arc))
    assert fetched <= p.data_size + 2 * MiB, (fetched, p.data_size)


@pytest.mark.expect_log(STREAM_LOG)
def test_a_mismatch_found_at_the_end_of_the_decode_fails_the_read_and_a_retry_is_right(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arc = stream_archive
    p = arc.placed[b"random.bin"]
    at = p.data_offset + p.data_size // 2

    async def body() -> None:
        async with _streaming(fault_proxy, tmp_path / "cache") as s:
            flip = fault_proxy.add(Fault(Kind.FLIP, blob(arc.data_digest, at, at + 1), times=1, at=at))
            fh = (await s.fs.open(await inode_of(s.fs, "random.bin"), os.O_RDONLY, CTX)).fh
            assert await s.fs.read(fh, 0, 4096) == p.data[:4096]
            assert await verified_state(s.fs, "random.bin") == b"unverified"
            got = await read_handle(s.fs, fh, 4096)
            assert got == errno.EIO, "a read of a file that failed verification ended with success (or not EIO)"
            await s.fs.release(fh)
            assert flip.hits == 1, "the flip was never met"
            fault_proxy.clear()

            async def right() -> bool:
                return await read_file(s.fs, "random.bin") == p.data

            await until(right, "a retry never got the right bytes", GUARD_S)
            assert await verified_state(s.fs, "random.bin") == b"verified"

    run(body)
    assert "'random.bin'" in caplog.text
    assert "sha256 mismatch" in caplog.text or "corrupt zstd frame" in caplog.text
    assert "poisoned" not in caplog.text


@pytest.mark.expect_log(STREAM_LOG)
def test_a_file_larger_than_the_store_streams_through_a_window_and_a_reader_behind_it_restarts(
    fault_proxy: FaultProxy,
    stream_archive: StreamArchive,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    decodes: Any,
) -> None:
    p = stream_archive.placed[b"text.txt"]
    cache = tmp_path / "cache"

    async def body() -> None:
        async with _streaming(fault_proxy, cache, cache_size=16 * MiB) as s:
            fh = (await s.fs.open(await inode_of(s.fs, "text.txt"), os.O_RDONLY, CTX)).fh
            pos = 0
            for _ in range(40 * MiB // (128 << 10)):  # 40 MiB in order
                assert await s.fs.read(fh, pos, 128 << 10) == p.data[pos : pos + (128 << 10)]
                pos += 128 << 10
            assert "through a 4194304-byte window" in caplog.text
            assert await s.fs.read(fh, MiB, 4096) == p.data[MiB : MiB + 4096]  # far behind the window
            await s.fs.release(fh)
            assert "behind the decode window" in caplog.text
            assert decodes("text.txt") == 2
            assert await read_file(s.fs, "text.txt") == p.data
            await until(lambda: _is_verified(s, "text.txt"), "never verified")

    run(body)
    cached = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    assert cached <= 16 * MiB + MiB, cached
    assert not _tmp_files(cache)


@pytest.mark.expect_log(STREAM_LOG)
def test_every_reader_gone_mid_decode_stops_it_cleanly_and_the_next_read_works(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path, decodes: Any
) -> None:
    arc = stream_archive
    p = arc.placed[b"text.txt"]
    at = p.data_offset + p.data_size * 7 // 10
    cache = tmp_path / "cache"

    async def body() -> None:
        async with _streaming(fault_proxy, cache) as s:
            drip = fault_proxy.add(Fault(Kind.DRIP, blob(arc.data_digest, at, at + 1), rate_bps=256 << 10))
            ino = await inode_of(s.fs, "text.txt")
            fhs = [(await s.fs.open(ino, os.O_RDONLY, CTX)).fh for _ in range(2)]
            assert await s.fs.read(fhs[0], 0, 4096) == p.data[:4096]
            assert await s.fs.read(fhs[1], 5 * MiB, 4096) == p.data[5 * MiB : 5 * MiB + 4096]

            async def decoding() -> bool:
                return bool(_tmp_files(cache))

            async def stopped() -> bool:
                return not _tmp_files(cache)

            await until(decoding, "no decode under way", GUARD_S)
            for fh in fhs:
                await s.fs.release(fh)
            await until(stopped, "the decode's temp file outlived its readers", GUARD_S)
            assert drip.hits >= 1, "the decode never reached the slow part"
            fault_proxy.clear()
            assert await read_file(s.fs, "text.txt") == p.data
            await until(lambda: _is_verified(s, "text.txt"), "never verified")

            async def stored() -> bool:
                return bool(_content_files(cache))

            await until(stored, "the verified file never reached the store")
            assert not _tmp_files(cache)
            assert decodes("text.txt") == 2
            assert await read_file(s.fs, "text.txt", 20 * MiB, MiB) == p.data[20 * MiB : 21 * MiB]
            assert decodes("text.txt") == 2  # verified and kept: from the store

    run(body)


@pytest.mark.expect_log(STREAM_LOG)
def test_strict_keeps_verify_before_serve(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path, decodes: Any
) -> None:
    p = stream_archive.placed[b"text.txt"]
    strict = ReaderConfig("strict", STREAM.verify_threshold, STREAM.wait_s)

    async def body() -> None:
        async with _streaming(fault_proxy, tmp_path / "cache", strict) as s:
            assert await read_file(s.fs, "text.txt", 0, 4096) == p.data[:4096]
            assert await verified_state(s.fs, "text.txt") == b"verified"  # checked whole before the first byte

    run(body)
    assert decodes("text.txt") == 0


# -- test_request_timeout.py: every request within its bound while the registry stalls -------------

BOUND_S = 3.0  # the handlers' deadline (a mount's comes from the kernel's FUSE request timeout)
FILES = 2_000
SEED = 24
READERS = 64
HANG_GUARD_S = 25.0  # three reads per reader, each ended by the bound; below the 30 s --timeout


@pytest.mark.expect_log(STREAM_LOG)
def test_a_registry_stalled_past_the_bound_under_64_readers_answers_eio_in_time(
    fault_proxy: FaultProxy, registry: Registry, tmp_path: Path
) -> None:
    """The daemon's half of test_request_timeout.py: with the whole data blob stalled for twice
    the bound, 64 concurrent readers get bytes or EIO (never another errno, never wrong bytes),
    ended by the bound rather than the longer --timeout, metadata is answered meanwhile, and once
    the registry answers again the files that failed read right."""
    digest = load.build(tmp_path / "archive", FILES, SEED)
    ref = Reference.parse(f"{registry.host}/twins/reqtime:v1")
    trio.run(functools.partial(push_archive, tmp_path / "archive", ref, RegistryOptions()))
    specs = load.layout(FILES, SEED)
    truth = {spec.number: load.content(spec, SEED) for spec in specs if spec.size < (1 << 20)}
    errors: dict[int, int] = {}
    wrong: list[str] = []
    failed: set[int] = set()

    async def body() -> None:
        options = RegistryOptions(timeout_s=30.0)  # longer than the bound: the bound answers first
        async with serving(
            f"{fault_proxy.host}/twins/reqtime:v1",
            tmp_path / "cache",
            ReaderConfig(wait_s=30.0),
            options=options,
            deadline_s=BOUND_S,
        ) as s:
            stall = fault_proxy.add(Fault(Kind.STALL, blob(digest)))
            rng = random.Random(SEED)
            numbers = sorted(truth)

            async def reader(k: int) -> None:
                r = random.Random(k)
                for _ in range(3):
                    n = r.choice(numbers)
                    got = await read_file(s.fs, specs[n].path)
                    if isinstance(got, int):
                        errors[got] = errors.get(got, 0) + 1
                        failed.add(n)
                    elif got != truth[n]:
                        wrong.append(specs[n].path)

            # a hang guard below the 30 s --timeout: only the bound can end these reads in it
            with trio.fail_after(HANG_GUARD_S):
                async with trio.open_nursery() as nursery:
                    for k in range(READERS):
                        nursery.start_soon(reader, k)
                    await trio.sleep(BOUND_S / 2)
                    # metadata is answered while every reader waits on the registry
                    await s.fs.statfs(CTX)
                    listed = await list_dir(s.fs, ROOT_INO)
                    assert len(listed) - 2 == FILES // load.FILES_PER_DIR
            assert stall.hits > 0
            fault_proxy.clear()  # the registry answers again
            again = sorted(failed | {rng.choice(numbers) for _ in range(50)})
            for n in again:
                assert await read_file(s.fs, specs[n].path) == truth[n], specs[n].path

    run(body)
    assert wrong == []
    assert set(errors) <= {errno.EIO}, errors
    assert errors.get(errno.EIO, 0) > 0  # the stall was met
