"""Kernel-free twins of tests/fuse/test_lazy_trust.py and tests/fuse/test_lazy.py: the same archives
on the session's real registry, behind the same FaultProxy (a flipped bit, a stall) or QuirkProxy
(request counts, a corrupting mirror), read through the handlers.

The rule of test_lazy_trust.py holds here too: a read of a file to its end either gets the right
bytes or fails with EIO, and once the fault is gone the next read gets the right bytes. Where the
mounted test waits for FUSE's RELEASE to arrive after close(), nothing is waited for here: release
is answered before the next open is sent."""

from __future__ import annotations

import errno
import functools
import itertools
import random
import subprocess
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio

from blobmount.cache.chunks import ChunkStore
from blobmount.fetch import ChunkedSource
from blobmount.index import IndexView
from blobmount.integrity.records import VerifiedRecords
from blobmount.pieces import PIECE_BYTES
from blobmount.reader import ReaderConfig
from blobmount.registry.client import RegistryOptions
from tests.support.aio import run
from tests.support.faults import Fault, FaultProxy, Kind, blob
from tests.support.handlers import CTX, Served, inode_of, read_file, serving, until, verified_state
from tests.support.mounts import blobmount_cmd
from tests.support.servers import QuirkProxy, Registry
from tests.support.trust import (
    BIG,
    CHUNK,
    FILE_BYTES,
    SMALL_BYTES,
    SMALL_FILES,
    TRUST_TIMEOUT_S,
    KiB,
    LazyArchive,
    MiB,
    TrustArchive,
    flip_once,
    prefetch_small,
    push_lazy_archive,
    push_trust_archive,
    ranges,
)

GUARD_S = 60.0

# -- test_lazy_trust.py's archive and settings ----------------------------------------------------

TRUST_REPO = "twins/trust:v1"
TRUST = ReaderConfig(verify_threshold=256 * KiB, wait_s=TRUST_TIMEOUT_S)  # --verify-threshold 256K --timeout 3
TRUST_LOG = r"^blobmount\.(fetch|remote|registry(\.\w+)*|reader|fs|streaming|cache(\.\w+)*): (?!unexpected error)"


@pytest.fixture(scope="module")
def trust_archive(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> TrustArchive:
    return push_trust_archive(registry, TRUST_REPO, tmp_path_factory.mktemp("trust-twin-archive"))


def _trusting(
    fault_proxy: FaultProxy, cache: Path, config: ReaderConfig = TRUST, **kw: Any
) -> AbstractAsyncContextManager[Served]:
    options = RegistryOptions(timeout_s=TRUST_TIMEOUT_S)
    return serving(f"{fault_proxy.host}/{TRUST_REPO}", cache, config, options=options, **kw)


def _right_or_failed(got: bytes | int, data: bytes) -> bool:
    """The promise: a full read ends with the right bytes or with EIO. Returns whether right."""
    assert got == errno.EIO or got == data, "a full read ended with wrong bytes (or not EIO)"
    return got == data


async def _right_soon(s: Served, name: str, data: bytes) -> None:
    """After a failed read the next one is right (a re-verification it waits for: two tries)."""
    for _ in range(2):
        got = await read_file(s.fs, name)
        if got != errno.EIO:
            assert got == data, "a read after the fault got wrong bytes"
            return
    pytest.fail(f"{name}: still failing after the fault was gone")


async def _verified(s: Served, name: str) -> bool:
    return await verified_state(s.fs, name) == b"verified"


@pytest.mark.expect_log(TRUST_LOG)
@pytest.mark.parametrize("policy", ["lazy", "background", "strict"])
def test_one_flip_in_one_full_read(
    policy: str, fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = "one.bin"
    data = trust_archive.placed[name.encode()].data
    config = ReaderConfig(policy, TRUST.verify_threshold, TRUST.wait_s)  # type: ignore[arg-type]

    async def body() -> None:
        async with _trusting(fault_proxy, tmp_path / "cache", config) as s:
            fault, _ = flip_once(fault_proxy, trust_archive, name, 0.5)
            with trio.fail_after(GUARD_S):
                got = await read_file(s.fs, name)
            assert fault.hits == 1, "the flip was never met"
            if not _right_or_failed(got, data):
                assert "sha256 mismatch" in caplog.text
            await _right_soon(s, name, data)
            await until(lambda: _verified(s, name), "never verified")
            assert await read_file(s.fs, name) == data

    run(body)
    assert "poisoned" not in caplog.text


@pytest.mark.expect_log(TRUST_LOG)
def test_a_flip_in_a_partial_read_then_a_full_read_in_another_open(
    fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path
) -> None:
    name = "two.bin"
    data = trust_archive.placed[name.encode()].data

    async def body() -> None:
        async with _trusting(fault_proxy, tmp_path / "cache") as s:
            fault, _ = flip_once(fault_proxy, trust_archive, name, 0.25)
            head = await read_file(s.fs, name, 0, FILE_BYTES * 6 // 10)
            assert fault.hits == 1, "the flip was never met"
            assert isinstance(head, bytes)  # a partial read may get unverified bytes: the lazy policy
            fault_proxy.clear()
            _right_or_failed(await read_file(s.fs, name), data)
            await _right_soon(s, name, data)
            await until(lambda: _verified(s, name), "never verified")

    run(body)


@pytest.mark.expect_log(TRUST_LOG)
def test_a_file_read_in_pieces_by_two_opens_is_verified(
    fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = "pieces.bin"
    data = trust_archive.placed[name.encode()].data
    half = FILE_BYTES // 2

    async def body() -> None:
        async with _trusting(fault_proxy, tmp_path / "cache") as s:
            fault, _ = flip_once(fault_proxy, trust_archive, name, 0.25)
            assert isinstance(await read_file(s.fs, name, 0, half), bytes)
            assert fault.hits == 1
            fault_proxy.clear()
            await read_file(s.fs, name, half, FILE_BYTES - half)  # may fail: it completes the file
            await until(lambda: _verified(s, name), "never verified")
            assert await read_file(s.fs, name) == data

    run(body)
    assert "sha256 mismatch" in caplog.text


@pytest.mark.expect_log(TRUST_LOG)
def test_a_file_read_in_part_and_closed_is_verified_from_the_cache(
    fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--prefetch brings the file into the cache with a flipped bit; a part of it is read and the
    file closed; the rest is in the cache, so it is hashed anyway, found wrong, read again from
    the origin: verified, and right."""
    name = "part.bin"
    data = trust_archive.placed[name.encode()].data
    fault, _ = flip_once(fault_proxy, trust_archive, name, 0.25)

    async def body() -> None:
        async with _trusting(fault_proxy, tmp_path / "cache", prefetch=(name,)) as s:
            ino = await inode_of(s.fs, name)
            stored = int(await s.fs.getxattr(ino, b"user.blobmount.stored_size", CTX))
            assert int(await s.fs.getxattr(ino, b"user.blobmount.cached_bytes", CTX)) == stored
            assert fault.hits == 1
            fault_proxy.clear()
            assert isinstance(await read_file(s.fs, name, 0, FILE_BYTES // 2), bytes)
            await until(lambda: _verified(s, name), "never verified")
            assert await read_file(s.fs, name) == data

    run(body)
    assert "read in part and closed" in caplog.text


@pytest.mark.expect_log(TRUST_LOG)
def test_a_remount_over_a_cache_holding_a_corrupted_chunk(
    fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = "remount.bin"
    placed = trust_archive.placed[name.encode()]
    cache = tmp_path / "cache"

    async def first() -> None:
        async with _trusting(fault_proxy, cache) as s:
            fault, at = flip_once(fault_proxy, trust_archive, name, 0.05)
            tail = placed.data_offset + 4 * MiB
            fault_proxy.add(
                Fault(Kind.STALL, blob(trust_archive.data_digest, tail, placed.data_offset + placed.data_size))
            )
            assert isinstance(await read_file(s.fs, name, 0, MiB), bytes)
            assert fault.hits == 1

            async def on_disk() -> bool:
                return bool([p for p in (cache / "chunks").rglob(str(at // CHUNK)) if p.is_file()])

            await until(on_disk, "the flipped chunk never reached the disk cache", 10)
            assert await verified_state(s.fs, name) == b"unverified"
            assert "sha256 mismatch" not in caplog.text  # the premise: this filesystem never found it

    async def again() -> None:
        async with _trusting(fault_proxy, cache) as s:
            _right_or_failed(await read_file(s.fs, name), placed.data)
            await _right_soon(s, name, placed.data)
        async with _trusting(fault_proxy, cache) as s:
            assert await read_file(s.fs, name) == placed.data

    run(first)
    fault_proxy.clear()
    run(again)


@pytest.mark.expect_log(TRUST_LOG)
def test_a_stalled_file_reads_again_as_soon_as_the_origin_answers(
    fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path
) -> None:
    """The read that waited --timeout answers EIO and takes the request it waited for with it (no
    retry keeps a dead request open for a later read to join); the next read is served at once."""
    p = trust_archive.placed[b"stall.bin"]
    at = p.data_offset + MiB + 7

    async def body() -> None:
        async with _trusting(fault_proxy, tmp_path / "cache") as s:
            fault = fault_proxy.add(
                Fault(Kind.STALL, blob(trust_archive.data_digest, at, at + 1), stall_s=60, outlives_clear=True)
            )
            with trio.fail_after(4 * TRUST_TIMEOUT_S):
                assert await read_file(s.fs, "stall.bin", MiB + 7, 4096) == errno.EIO
            assert fault.hits >= 1
            for _ in range(25):  # the proxy notices a hang-up within its 20 ms poll
                if fault.stalled == 0:
                    break
                await trio.sleep(0.02)
            hits = fault.hits
            for _ in range(30):
                assert fault.stalled == 0, "a request nobody waits for is still open"
                await trio.sleep(0.05)
            assert fault.hits == hits, "a request nobody waits for was sent again"
            fault_proxy.clear()
            seen = len(fault_proxy.state.seen)
            with trio.fail_after(4 * TRUST_TIMEOUT_S):
                assert await read_file(s.fs, "stall.bin", MiB + 7, 4096) == p.data[MiB + 7 : MiB + 7 + 4096]
            assert [h for _m, _p, h in fault_proxy.state.seen[seen:] if h.get("range")], "served without a request"

    run(body)


# -- test_lazy.py's archive -----------------------------------------------------------------------

LAZY_REPO = "twins/lazy"
LAZY = ReaderConfig(wait_s=10.0)  # --timeout 10
LAZY_OPTIONS = RegistryOptions(timeout_s=10.0)


@pytest.fixture(scope="module")
def lazy(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> LazyArchive:
    src, out = tmp_path_factory.mktemp("lazy-twin-src"), tmp_path_factory.mktemp("lazy-twin-archive")
    return push_lazy_archive(registry, LAZY_REPO, src, out)


def _lazy(source: str, cache: Path, config: ReaderConfig = LAZY, **kw: Any) -> AbstractAsyncContextManager[Served]:
    return serving(source, cache, config, options=kw.pop("options", LAZY_OPTIONS), **kw)


def test_one_small_file_costs_at_most_two_chunks(lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path) -> None:
    async def body() -> None:
        async with _lazy(f"{quirk_proxy.host}/{lazy.repo}:v1", tmp_path / "cache") as s:
            quirk_proxy.state.seen.clear()
            assert await read_file(s.fs, "small/f0500.txt") == lazy.files["small/f0500.txt"]
            await trio.sleep(0.3)  # anything prefetched in the background would show up now
            assert len(ranges(quirk_proxy)) == 1  # no directory prefetch on a first read
            assert sum(b - a for a, b in ranges(quirk_proxy)) <= 2 * CHUNK
            assert not [p for _m, p, _h in quirk_proxy.state.seen if "/manifests/" in p]  # pinned at open

    run(body)


def test_sequential_read_is_few_requests_each_byte_once(
    lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    async def body() -> None:
        async with _lazy(f"{quirk_proxy.host}/{lazy.repo}:v1", tmp_path / "cache") as s:
            quirk_proxy.state.seen.clear()
            assert await read_file(s.fs, "big.bin") == lazy.files["big.bin"]

    run(body)
    got = sorted(ranges(quirk_proxy))
    assert len(got) <= 16, got  # windows grow 1 -> 64 MiB; requests are capped at 8 MiB
    for (_a, b), (c, _d) in itertools.pairwise(got):
        assert b <= c, "a byte was fetched twice"
    assert sum(b - a for a, b in got) <= BIG + 2 * CHUNK


def test_small_files_read_in_order_prefetch_their_directory(
    lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    names = sorted(n for n in lazy.files if n.startswith("small/"))

    async def body() -> None:
        async with _lazy(f"{quirk_proxy.host}/{lazy.repo}:v1", tmp_path / "cache") as s:
            quirk_proxy.state.seen.clear()
            for name in names:
                assert await read_file(s.fs, name) == lazy.files[name]

    run(body)
    chunks = SMALL_FILES * SMALL_BYTES // CHUNK
    assert len(ranges(quirk_proxy)) < chunks // 2, ranges(quirk_proxy)
    assert sum(b - a for a, b in ranges(quirk_proxy)) <= SMALL_FILES * SMALL_BYTES + 2 * CHUNK


def test_random_reads_fetch_a_piece_each_and_no_read_ahead(
    lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    offsets = [i * 2 * MiB + 1000 for i in range(11)]
    random.Random(3).shuffle(offsets)

    async def body() -> None:
        async with _lazy(f"{quirk_proxy.host}/{lazy.repo}:v1", tmp_path / "cache") as s:
            quirk_proxy.state.seen.clear()
            fh = (await s.fs.open(await inode_of(s.fs, "big.bin"), 0, CTX)).fh
            for off in offsets:
                assert await s.fs.read(fh, off, 4096) == lazy.files["big.bin"][off : off + 4096]
            await s.fs.release(fh)
            await trio.sleep(0.3)

    run(body)
    got = ranges(quirk_proxy)
    assert len(got) == len(offsets), got
    assert all(b - a <= 2 * PIECE_BYTES for a, b in got), got  # pieces (pieces.py), not chunks


def test_warm_reopens_by_digest_and_by_tag(lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    want = lazy.files["other/blob.bin"]

    async def by(ref: str) -> None:
        async with _lazy(ref, cache) as s:
            assert await read_file(s.fs, "other/blob.bin") == want

    run(by, f"{quirk_proxy.host}/{lazy.repo}:v1")
    quirk_proxy.state.seen.clear()
    run(by, f"{quirk_proxy.host}/{lazy.repo}@{lazy.digest}")
    assert quirk_proxy.state.seen == []  # a digest reopen of cached data makes no request at all
    run(by, f"{quirk_proxy.host}/{lazy.repo}:v1")
    assert [(meth, "/manifests/" in p) for meth, p, _h in quirk_proxy.state.seen] == [("HEAD", True)]


@pytest.mark.expect_log(r"--offline")
def test_prefetch_then_offline_with_the_registry_gone(
    lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    ref = f"{quirk_proxy.host}/{lazy.repo}:v1"
    prefetch_small(ref, cache)
    quirk_proxy.stop()  # the registry is unreachable from here on

    async def body() -> None:
        async with _lazy(ref, cache, offline=True) as s:
            for i in range(0, SMALL_FILES, 97):
                name = f"small/f{i:04}.txt"
                assert await read_file(s.fs, name) == lazy.files[name]
            assert await read_file(s.fs, "big.bin") == errno.EIO

    run(body)
    assert "--offline" in caplog.text


def test_verified_state_survives_a_reopen(lazy: LazyArchive, registry: Registry, tmp_path: Path) -> None:
    """Read straight through, as fast as the handlers answer: the last chunks land and the file is
    hashed to its end before their disk writes finish; the record waits for them."""
    cache = tmp_path / "cache"
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"
    head = lazy.files["big.bin"][:1]

    async def body() -> None:
        async with _lazy(src, cache) as s:
            assert await read_file(s.fs, "big.bin") == lazy.files["big.bin"]
            assert await verified_state(s.fs, "big.bin") == b"verified"
        async with _lazy(src, cache) as s:
            assert await read_file(s.fs, "big.bin", 0, 1) == head
            assert await verified_state(s.fs, "big.bin") == b"verified"  # no re-hash
        async with _lazy(src, tmp_path / "cold") as s:
            assert await read_file(s.fs, "big.bin", 0, 1) == head
            assert await verified_state(s.fs, "big.bin") == b"unverified"  # the control

    run(body)


def test_the_record_of_a_file_waits_for_the_write_of_its_last_chunk(
    lazy: LazyArchive, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk write of the file's last chunk is held (a slow disk) until the verified record
    waits for it, or was written without it: the record is left, and a reopen trusts the file
    without hashing it. Deterministic: no timing decides whether the write landed first."""
    cache = tmp_path / "cache"
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"
    release = trio.Event()
    held: list[int] = []
    real_store, real_remember = ChunkStore.store, VerifiedRecords.remember
    real_saved = getattr(ChunkedSource, "saved", None)

    def store(self: ChunkStore, index: int, data: bytes, digest: int | None = None) -> bool:
        if index in held:  # a worker thread: wait for the trio event
            trio.from_thread.run(release.wait)
        return real_store(self, index, data, digest)

    async def saved(self: ChunkedSource, first: int, last: int) -> None:
        release.set()  # the record waits for the writes: the disk catches up
        if real_saved is not None:
            await real_saved(self, first, last)

    async def remember(self: VerifiedRecords, start: int, end: int, sha256: bytes) -> None:
        try:
            await real_remember(self, start, end, sha256)
        finally:
            release.set()  # the record was written or given up without the held write

    monkeypatch.setattr(ChunkStore, "store", store)
    monkeypatch.setattr(ChunkedSource, "saved", saved, raising=False)
    monkeypatch.setattr(VerifiedRecords, "remember", remember)

    async def body() -> None:
        async with _lazy(src, cache) as s:
            view = IndexView(s.archive.index_bytes)
            entry = view.entry(view.resolve(b"big.bin"))
            held.append((entry.data_offset + entry.original_size - 1) // CHUNK)
            with trio.fail_after(GUARD_S):
                assert await read_file(s.fs, "big.bin") == lazy.files["big.bin"]
            assert release.is_set()
            assert await verified_state(s.fs, "big.bin") == b"verified"
        async with _lazy(src, cache) as s:
            assert await read_file(s.fs, "big.bin", 0, 1) == lazy.files["big.bin"][:1]
            assert await verified_state(s.fs, "big.bin") == b"verified", "no record: hashed again"

    run(body)


def test_background_verification_completes_without_the_reader(
    lazy: LazyArchive, registry: Registry, tmp_path: Path
) -> None:
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"

    async def body() -> None:
        async with _lazy(src, tmp_path / "cache", ReaderConfig("background", wait_s=10.0)) as s:
            fh = (await s.fs.open(await inode_of(s.fs, "big.bin"), 0, CTX)).fh
            assert await s.fs.read(fh, 0, 10) == lazy.files["big.bin"][:10]
            await until(lambda: _verified(s, "big.bin"), "background verification never finished")
            await s.fs.release(fh)

    run(body)


@pytest.mark.expect_log(r"sha256 mismatch|reading it again|mirror")
def test_a_corrupting_mirror_is_overruled_by_the_origin(
    lazy: LazyArchive, registry: Registry, quirk_proxy: QuirkProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    quirk_proxy.state.corrupt_ranges = True  # a mirror that flips a byte of every range
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"
    options = RegistryOptions(timeout_s=10.0, mirrors=(quirk_proxy.host,))

    async def body() -> None:
        async with _lazy(src, tmp_path / "cache", options=options) as s:
            # 4 MiB: not above the default --verify-threshold, so verified before its first byte
            # is served: the mirror's bytes fail the hash, the origin's are the ones served
            assert await read_file(s.fs, "other/blob.bin") == lazy.files["other/blob.bin"]
            await until(lambda: _verified(s, "other/blob.bin"), "never verified from the origin")
            assert await read_file(s.fs, "other/blob.bin") == lazy.files["other/blob.bin"]
            # small files are verified before a byte is served: the mirror's bytes never reach a reader
            assert await read_file(s.fs, "small/f0001.txt") == lazy.files["small/f0001.txt"]

    run(body)
    assert "reading it again" in caplog.text
    assert "poison" not in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.expect_log(r"^blobmount\.cache\.chunks: chunk cache: ")
def test_a_tiny_cache_stays_within_its_limit(lazy: LazyArchive, registry: Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"

    async def body() -> None:
        async with _lazy(src, cache, cache_size=3 * MiB) as s:
            assert await read_file(s.fs, "big.bin") == lazy.files["big.bin"]
            await trio.sleep(0.3)

    run(body)
    stored = sum(f.stat().st_size for d in ("chunks", "content") for f in (cache / d).rglob("*") if f.is_file())
    assert stored <= 3 * MiB


def test_a_pruned_cache_is_refetched_by_the_next_read(lazy: LazyArchive, registry: Registry, tmp_path: Path) -> None:
    """`blobmount cache prune --size 0` on the live cache of a filesystem being served: its
    chunks go, and the next read fetches what it needs again (the read handler's side of
    test_lazy.py's test_cache_status_and_prune_on_a_live_cache)."""
    cache = tmp_path / "cache"
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"

    async def body() -> None:
        async with _lazy(src, cache) as s:
            assert await read_file(s.fs, "other/blob.bin") == lazy.files["other/blob.bin"]
            pruned = await trio.to_thread.run_sync(
                functools.partial(
                    subprocess.run,
                    blobmount_cmd("cache", "prune", "--cache-dir", str(cache), "--size", "0"),
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            )
            assert pruned.returncode == 0, pruned.stderr
            chunk_files = [p for p in (cache / "chunks").rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
            assert not chunk_files
            assert await read_file(s.fs, "small/f0002.txt") == lazy.files["small/f0002.txt"]

    run(body)


def test_two_filesystems_sharing_a_cache_fetch_each_chunk_once(
    lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    cache = tmp_path / "shared-cache"
    src = f"{quirk_proxy.host}/{lazy.repo}@{lazy.digest}"
    results: list[bytes | int] = []

    async def body() -> None:
        async with _lazy(src, cache) as a, _lazy(src, cache) as b:
            quirk_proxy.state.seen.clear()

            async def reader(s: Served) -> None:
                results.append(await read_file(s.fs, "big.bin"))

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader, a)
                    nursery.start_soon(reader, b)

    run(body)
    assert results == [lazy.files["big.bin"]] * 2
    covered: list[int] = []
    for a0, b0 in ranges(quirk_proxy):
        covered.extend(range(a0 // CHUNK, (b0 - 1) // CHUNK + 1))
    assert len(covered) == len(set(covered)), "a chunk was fetched by both filesystems"


@pytest.mark.expect_log(r"failed its checksum")
def test_a_flipped_chunk_on_disk_is_caught_and_refetched(
    lazy: LazyArchive, registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"

    async def read_big() -> None:
        async with _lazy(src, cache) as s:
            assert await read_file(s.fs, "big.bin") == lazy.files["big.bin"]

    run(read_big)
    chunk_files = sorted(p for p in (cache / "chunks").rglob("*") if p.is_file() and p.name.isdigit())
    assert chunk_files
    raw = bytearray(chunk_files[0].read_bytes())
    raw[100] ^= 0x01
    chunk_files[0].write_bytes(bytes(raw))
    run(read_big)
    assert "failed its checksum" in caplog.text


@pytest.mark.expect_log(r"^blobmount\.cache(\.\w+)*: ")
def test_a_full_cache_disk_and_a_deleted_cache_dir_keep_reads_working(
    lazy: LazyArchive, registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"
    tiny = tmp_path / "tiny"
    tiny.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(tiny)], check=True, timeout=30)
    try:

        async def full() -> None:
            async with _lazy(src, tiny / "cache") as s:
                assert await read_file(s.fs, "big.bin") == lazy.files["big.bin"]
                assert await read_file(s.fs, "other/blob.bin") == lazy.files["other/blob.bin"]

        run(full)
        assert "serving from memory" in caplog.text
    finally:
        if subprocess.run(["umount", str(tiny)], check=False, timeout=30).returncode:
            subprocess.run(["umount", "--lazy", str(tiny)], check=True, timeout=30)  # something holds it: detach
    cache = tmp_path / "cache"

    async def deleted() -> None:
        async with _lazy(src, cache) as s:
            assert await read_file(s.fs, "small/f0000.txt") == lazy.files["small/f0000.txt"]
            for _ in range(20):  # the filesystem may be writing into it while it goes
                await trio.to_thread.run_sync(
                    functools.partial(subprocess.run, ["rm", "-rf", str(cache)], check=False, timeout=30)
                )
                if not cache.exists():
                    break
            assert await read_file(s.fs, "big.bin") == lazy.files["big.bin"]
            for i in range(500, 520):
                name = f"small/f{i:04}.txt"
                assert await read_file(s.fs, name) == lazy.files[name]

    run(deleted)
