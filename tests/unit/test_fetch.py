"""The fetch layer over an in-memory remote: single flight, wake-as-you-go, coalescing, read-ahead,
budgets, deadlines and faults. Timing-dependent paths run under trio's autojump clock (no wall time).
The same layer is proven against the real registry in tests/fuse/test_lazy.py."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from blobmount.cache import CacheDir, ChunkStore
from blobmount.errors import SourceError, TransientError
from blobmount.fetch import ChunkedSource
from blobmount.readahead import ReadHint
from blobmount.registry.retry import MAX_ATTEMPTS
from tests.support.aio import run, run_virtual
from tests.support.fakes import FakeRemote

CS = 4096  # chunk size for these tests: small blobs, many chunks
BLOB = random.Random(7).randbytes(64 * CS + 123)  # 65 chunks, the last one short
DIGEST = "ab" * 32


def _source(remote: FakeRemote, cache: CacheDir | None, **kw: Any) -> ChunkedSource:
    store = ChunkStore(cache, DIGEST, remote.size, CS, memory_bytes=kw.pop("memory_bytes", 8 * CS))
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("request_bytes", 16 * CS)
    kw.setdefault("ahead_bytes", 16 * CS)
    return ChunkedSource(remote, store, **kw)


@asynccontextmanager
async def serving(src: ChunkedSource) -> AsyncIterator[ChunkedSource]:
    async with src.serving():
        yield src


def run_jumping(fn: Callable[[], Awaitable[None]]) -> None:
    """Tests that wait out timeouts: the autojump clock, with a memory-only store (no threads);
    the others run on the real clock (aio.run), since chunk writes run on worker threads."""
    run_virtual(fn)


def test_one_read_many_chunks_is_one_request_and_exact(tmp_path: Path) -> None:
    remote = FakeRemote(BLOB)

    async def go() -> None:
        async with serving(_source(remote, CacheDir(tmp_path / "c"))) as src:
            assert await src.read_range(100, 5 * CS + 7) == BLOB[100 : 5 * CS + 7]
            assert remote.requests == [(0, 6 * CS, False)]
            assert await src.read_range(CS, 2 * CS) == BLOB[CS : 2 * CS]  # memory hit
            assert len(remote.requests) == 1

    run(go)


def test_coalescing_skips_cached_chunks_and_respects_the_request_cap(tmp_path: Path) -> None:
    remote = FakeRemote(BLOB)

    async def go() -> None:
        async with serving(_source(remote, CacheDir(tmp_path / "c"), request_bytes=4 * CS)) as src:
            await src.read_range(2 * CS, 3 * CS)  # chunk 2 cached
            remote.requests.clear()
            assert await src.read_range(0, 10 * CS) == BLOB[: 10 * CS]
            # chunks 0-1, then 3-6 and 7-9 (at most 4 chunks per request)
            assert sorted(remote.requests) == [(0, 2 * CS, False), (3 * CS, 7 * CS, False), (7 * CS, 10 * CS, False)]

    run(go)


def test_single_flight_many_readers_one_request(tmp_path: Path) -> None:
    remote = FakeRemote(BLOB, block_delay_s=0.01)
    results: list[bytes] = []

    async def go() -> None:
        async with serving(_source(remote, None)) as src:

            async def reader(i: int) -> None:
                results.append(await src.read_range(3 * CS + i, 3 * CS + i + 100))

            async with trio.open_nursery() as n:
                for i in range(16):
                    n.start_soon(reader, i)
            assert remote.requests == [(3 * CS, 4 * CS, False)]

    run_jumping(go)
    assert sorted(results) == sorted(BLOB[3 * CS + i : 3 * CS + i + 100] for i in range(16))


def test_waiters_wake_as_each_chunk_lands(tmp_path: Path) -> None:
    """A reader of chunk 0 is served while the rest of an 8-chunk request is still held back."""
    gate = trio.Event()
    remote = FakeRemote(BLOB, gate=gate, gate_after=CS + 1000)

    async def go() -> None:
        async with serving(_source(remote, None)) as src:
            whole: list[bytes] = []

            async def big() -> None:
                whole.append(await src.read_range(0, 8 * CS))

            async with trio.open_nursery() as n:
                n.start_soon(big)
                await trio.sleep(0.1)
                assert not gate.is_set()
                assert await src.read_range(10, 20) == BLOB[10:20]  # chunk 0 landed already
                assert not whole
                gate.set()
            assert whole == [BLOB[: 8 * CS]]
            assert len(remote.requests) == 1

    run_jumping(go)


@pytest.mark.expect_log(r"^blobmount\.fetch: data blob bytes ")
def test_a_failed_fetch_wakes_every_waiter_with_the_error_or_a_retry(tmp_path: Path) -> None:
    """The reader whose miss started the fetch gets its error; readers that only joined it get one
    fetch of their own (the fault may have cleared meanwhile), within their own timeout."""
    remote = FakeRemote(BLOB, faults=["fatal"], block_delay_s=0.01)
    errors: list[BaseException] = []
    got: list[bytes] = []

    async def go() -> None:
        async with serving(_source(remote, None)) as src:

            async def reader() -> None:
                try:
                    got.append(await src.read_range(0, 100))
                except SourceError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as n:
                for _ in range(5):
                    n.start_soon(reader)
                    await trio.sleep(0.001)  # the first one starts the fetch, the others join it
            assert not src._flights
            assert await src.read_range(0, 100) == BLOB[:100]  # a later read tries afresh

    run_jumping(go)
    assert len(errors) == 1
    assert "404" in str(errors[0])
    assert got == [BLOB[:100]] * 4
    assert len(remote.requests) == 2  # the failed fetch, then one retry shared by the four


def test_a_cancelled_fetch_wakes_its_waiters(tmp_path: Path) -> None:
    remote = FakeRemote(BLOB, faults=["stall"])
    got: list[BaseException] = []

    async def go() -> None:
        src = _source(remote, None, timeout_s=1000.0)
        async with trio.open_nursery() as outer:
            fetch_scope = trio.CancelScope()

            async def run_fetches() -> None:
                with fetch_scope:
                    async with trio.open_nursery() as n:
                        src.attach(n)
                        await trio.sleep_forever()

            outer.start_soon(run_fetches)
            await trio.sleep(0.01)

            async def reader() -> None:
                try:
                    await src.read_range(0, 10)
                except SourceError as exc:
                    got.append(exc)

            outer.start_soon(reader)
            await trio.sleep(1)
            fetch_scope.cancel()  # the mount goes away while a reader waits
        assert not src._flights

    run_jumping(go)
    assert len(got) == 1
    assert "cancelled" in str(got[0])


def test_a_stalled_body_is_resumed_and_a_read_never_waits_past_the_timeout(tmp_path: Path) -> None:
    async def go() -> None:
        remote = FakeRemote(BLOB, faults=["stall", None])
        async with serving(_source(remote, None, timeout_s=2.0)) as src:
            started = trio.current_time()
            # the first request stalls for the whole timeout: this read gives up at 2 s ...
            with pytest.raises(TransientError, match="--timeout 2 s"):
                await src.read_range(0, 100)
            assert trio.current_time() - started == pytest.approx(2.0, abs=0.01)
            # ... and takes the stalled request with it: the next read sends a second one
            await trio.sleep(1)
            assert await src.read_range(0, 100) == BLOB[:100]
            assert len(remote.requests) == 2

    run_jumping(go)


@pytest.mark.parametrize("fault", ["refuse", "reset", "truncate"])
def test_transient_faults_are_retried_from_the_first_missing_chunk(tmp_path: Path, fault: str) -> None:
    remote = FakeRemote(BLOB, faults=[fault])

    async def go() -> None:
        async with serving(_source(remote, None)) as src:
            assert await src.read_range(0, 8 * CS) == BLOB[: 8 * CS]
            assert src.stats.retries == 1

    run_jumping(go)
    first, second = remote.requests
    assert first == (0, 8 * CS, False)
    assert second[1] == 8 * CS
    if fault == "reset":
        assert second[0] == 4 * CS  # chunks 0-3 had landed before the reset: not asked again


@pytest.mark.expect_log(r"; retry \d+ in ", r"^blobmount\.fetch: data blob bytes ")
def test_max_attempts_faults_in_a_row_fail_the_read_then_it_recovers(tmp_path: Path) -> None:
    faults: list[str | None] = ["reset", "refuse", "truncate"] * MAX_ATTEMPTS
    remote = FakeRemote(BLOB, faults=faults[:MAX_ATTEMPTS])

    async def go() -> None:
        async with serving(_source(remote, None, timeout_s=60.0)) as src:
            with pytest.raises(TransientError):
                await src.read_range(CS, 2 * CS)
            assert await src.read_range(CS, 2 * CS) == BLOB[CS : 2 * CS]  # never poisoned

    run_jumping(go)


def test_sequential_reads_grow_the_window_and_a_seek_resets_it(tmp_path: Path) -> None:
    remote = FakeRemote(BLOB)

    async def go() -> None:
        async with serving(_source(remote, CacheDir(tmp_path / "c"), ahead_bytes=16 * CS)) as src:
            hint = ReadHint(0, len(BLOB))
            for i in range(12):
                assert await src.read_range(i * CS, (i + 1) * CS, hint) == BLOB[i * CS : (i + 1) * CS]
                await trio.sleep(0.01)
            sizes = [(e - s) // CS for s, e, _ in remote.requests]
            # first read: its chunk only; then windows of 1, 2, 4, 8... chunks ahead (capped at 16)
            assert sizes[0] == 1
            assert max(sizes) > 2
            assert sum(sizes) <= 12 + 16 + 1  # never more than the window ahead of the reader
            fetched_before = len(remote.requests)
            await src.read_range(50 * CS, 50 * CS + 10, hint)  # a seek
            await trio.sleep(0.01)
            assert remote.requests[fetched_before:] == [(50 * CS, 51 * CS, False)]

    run(go)


def test_small_files_of_a_directory_prefetch_from_the_second_miss(tmp_path: Path) -> None:
    remote = FakeRemote(BLOB)

    async def go() -> None:
        async with serving(_source(remote, CacheDir(tmp_path / "c"))) as src:
            hint = ReadHint(0, 40 * CS, directory=True)
            await src.read_range(0, 100, hint)
            await trio.sleep(0.01)
            assert remote.requests == [(0, CS, False)]  # the first read of a directory: no prefetch
            await src.read_range(2 * CS, 2 * CS + 100, hint)
            await trio.sleep(0.01)
            ahead = [r for r in remote.requests[1:] if r[0] > 2 * CS]
            assert ahead, remote.requests
            assert max(e for _, e, _ in remote.requests) <= 40 * CS  # never past the directory

    run(go)


def test_offline_serves_the_cache_and_refuses_the_rest(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "c")

    async def go() -> None:
        async with serving(_source(FakeRemote(BLOB), cache)) as src:
            await src.read_range(0, 2 * CS)
        await trio.sleep(0.1)
        remote = FakeRemote(BLOB)
        async with serving(_source(remote, cache, offline=True)) as src:
            assert await src.read_range(10, CS + 10) == BLOB[10 : CS + 10]
            with pytest.raises(SourceError, match="--offline"):
                await src.read_range(5 * CS, 5 * CS + 1)
        assert remote.requests == []

    run(go)


@pytest.mark.expect_log("failed its checksum or length; discarded and refetched")
def test_a_damaged_chunk_file_is_a_miss_never_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = CacheDir(tmp_path / "c")

    async def go() -> None:
        async with serving(_source(FakeRemote(BLOB), cache)) as src:
            await src.read_range(0, 3 * CS)
        chunk_dir = tmp_path / "c" / "chunks" / f"{DIGEST}-{CS}"
        flipped = bytearray((chunk_dir / "1").read_bytes())
        flipped[7] ^= 1
        (chunk_dir / "1").write_bytes(bytes(flipped))
        os.truncate(chunk_dir / "2", 100)  # torn: cut short
        remote = FakeRemote(BLOB)
        async with serving(_source(remote, cache)) as src:
            assert await src.read_range(0, 3 * CS) == BLOB[: 3 * CS]
        refetched = {i for s, e, _ in remote.requests for i in range(s // CS, e // CS)}
        assert refetched == {1, 2}  # the good chunk 0 came from disk

    with caplog.at_level(logging.WARNING):
        run(go)
    assert caplog.text.count("failed its checksum or length") == 2


def test_the_byte_limit_holds_and_evicts_least_recently_used(tmp_path: Path) -> None:
    limit = 10 * (CS + 16)
    cache = CacheDir(tmp_path / "c", limit)

    async def go() -> None:
        async with serving(_source(FakeRemote(BLOB), cache)) as src:
            for i in range(30):
                assert await src.read_range(i * CS, i * CS + 1) == BLOB[i * CS : i * CS + 1]
                await trio.sleep(0.05)
                on_disk = sum(f.stat().st_size for f in (tmp_path / "c" / "chunks").rglob("*") if f.is_file())
                assert on_disk <= limit
                assert cache.usage().accounted_bytes <= limit

    run(go)
    names = {int(p.name) for p in (tmp_path / "c" / "chunks").rglob("*") if p.is_file()}
    assert 29 in names
    assert 0 not in names  # the oldest went first


@pytest.mark.expect_log("chunk cache: cannot write .*serving from memory")
def test_a_disk_that_refuses_chunks_degrades_to_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = CacheDir(tmp_path / "c")
    (tmp_path / "c" / "chunks").write_text("a file where the chunk directory should be")

    async def go() -> None:
        async with serving(_source(FakeRemote(BLOB), cache)) as src:
            for i in range(10):
                assert await src.read_range(i * CS, (i + 1) * CS) == BLOB[i * CS : (i + 1) * CS]
                await trio.sleep(0.01)
            assert src.store.degraded

    with caplog.at_level(logging.WARNING):
        run(go)
    assert caplog.text.count("serving from memory") == 1  # one warning, not one per chunk


def test_chunks_written_by_one_source_are_read_by_another(tmp_path: Path) -> None:
    """Two mounts of one archive sharing a cache directory: the second fetches nothing."""
    cache = CacheDir(tmp_path / "c")
    second = FakeRemote(BLOB)

    async def go() -> None:
        async with serving(_source(FakeRemote(BLOB), cache)) as src:
            await src.read_range(0, len(BLOB))
        await trio.sleep(0.1)
        async with serving(_source(second, CacheDir(tmp_path / "c"))) as src:
            assert await src.read_range(0, len(BLOB)) == BLOB

    run(go)
    assert second.requests == []


def test_chunks_read_with_keep_false_stay_in_memory_and_never_reach_the_disk(tmp_path: Path) -> None:
    """ReadHint(keep=False) (a zstd frame decoded into the content store): the reads and their
    read-ahead are served and kept in memory, but no chunk is written, so another source over the
    same cache directory fetches them itself; the same reads with the default hint are written."""
    first, second = FakeRemote(BLOB), FakeRemote(BLOB)
    end = 12 * CS

    async def go() -> None:
        async with serving(_source(first, CacheDir(tmp_path / "c"), memory_bytes=64 * CS)) as src:
            hint = ReadHint(0, len(BLOB), keep=False)
            for i in range(12):
                assert await src.read_range(i * CS, (i + 1) * CS, hint) == BLOB[i * CS : (i + 1) * CS]
                await trio.sleep(0.01)
            assert sum(e - s for s, e, _ in first.requests) > end  # read-ahead ran, not kept either
            fetched = len(first.requests)
            assert await src.read_range(0, end) == BLOB[:end]  # from memory
            assert len(first.requests) == fetched
            assert not any(src.store.on_disk(i) for i in range(len(BLOB) // CS + 1))
        await trio.sleep(0.1)
        async with serving(_source(second, CacheDir(tmp_path / "c"))) as src:
            assert await src.read_range(0, end, ReadHint(0, len(BLOB))) == BLOB[:end]
            assert second.requests, "chunks read with keep=False were found on disk"
            await trio.sleep(0.1)
            assert all(src.store.on_disk(i) for i in range(12))  # the default hint keeps them

    run(go)


def test_fill_uses_one_request_per_contiguous_range(tmp_path: Path) -> None:
    remote = FakeRemote(BLOB)
    seen: list[tuple[int, int]] = []

    async def go() -> None:
        async with serving(_source(remote, CacheDir(tmp_path / "c"), request_bytes=2 * CS)) as src:
            await src.read_range(20 * CS, 20 * CS + 1)
            remote.requests.clear()
            fetched = await src.fill([(0, 30 * CS), (40 * CS, 41 * CS)], lambda d, t: seen.append((d, t)))
            assert fetched == 30 * CS  # 29 chunks + 1, chunk 20 was cached

    run(go)
    assert sorted((s // CS, e // CS) for s, e, _ in remote.requests) == [(0, 20), (21, 30), (40, 41)]
    assert seen[-1][0] == seen[-1][1] == 31 * CS


@pytest.mark.expect_log("differs from the bytes a file was verified with")
def test_a_chunk_that_changed_since_verification_is_refused(tmp_path: Path) -> None:
    from blobmount.cache import MetaStore
    from blobmount.integrity.records import VerifiedRecords

    cache = CacheDir(tmp_path / "c")
    sha = b"\x11" * 32

    async def go() -> None:
        async with serving(_source(FakeRemote(BLOB), cache, meta=MetaStore(cache))) as src:
            await src.read_range(0, 4 * CS)
            await trio.sleep(0.1)
            await VerifiedRecords(src).remember(0, 4 * CS, sha)
        # another mount: the record holds while the chunks are the ones verified
        bad = bytearray(BLOB)
        bad[CS + 5] ^= 1
        remote = FakeRemote(bytes(bad))
        async with serving(_source(remote, cache, meta=MetaStore(cache), timeout_s=60.0)) as src:
            assert await VerifiedRecords(src).was_verified(0, 4 * CS, sha)
            assert not await VerifiedRecords(src).was_verified(0, 4 * CS, b"\x22" * 32)
            os.unlink(tmp_path / "c" / "chunks" / f"{DIGEST}-{CS}" / "1")  # evicted meanwhile
            with pytest.raises(TransientError, match="differs from the bytes a file was verified with"):
                await src.read_range(CS, CS + 10)  # the refetch brings other bytes: refused
            assert remote.requests[-1][2] is True  # and the retries went to the origin only
            assert src.stats.changed_chunks >= 1

    run(go)  # real time: the chunks of the first mount land through disk threads (~6 s of backoff)


class _Blackhole(FakeRemote):
    """Requests sent while `dead` is set never answer, even after it is cleared (a blackholed
    link: the connection stays dead); requests sent afterwards behave."""

    dead = True

    async def iter_range(self, start: int, end: int, *, origin_only: bool = False) -> AsyncGenerator[bytes, None]:
        if self.dead:
            self.requests.append((start, end, origin_only))
            await trio.sleep_forever()
        async for block in super().iter_range(start, end, origin_only=origin_only):
            yield block


class _GatedAhead(FakeRemote):
    """Requests for the first `held` bytes wait for the gate; every other request flows."""

    def __init__(self, blob: bytes, held: int, gate: trio.Event) -> None:
        super().__init__(blob)
        self.held = held
        self.held_gate = gate

    async def iter_range(self, start: int, end: int, *, origin_only: bool = False) -> Any:
        if start < self.held:
            await self.held_gate.wait()
        async for block in super().iter_range(start, end, origin_only=origin_only):
            yield block


def test_a_read_after_a_stall_cleared_does_not_wait_for_the_dead_request(tmp_path: Path) -> None:
    """A read that gave up after --timeout abandons the request it waited for: the next read
    sends its own at once instead of joining a retry that is stuck on a dead connection."""
    remote = _Blackhole(BLOB)

    async def go() -> None:
        async with serving(_source(remote, None, timeout_s=2.0)) as src:
            with pytest.raises(TransientError, match="--timeout 2 s"):
                await src.read_range(0, 100)
            await trio.sleep(1)  # a retry of the stalled request would be under way now
            remote.dead = False
            with trio.fail_after(0.5):  # virtual time: well before any retry's own deadline
                assert await src.read_range(0, 100) == BLOB[:100]
            assert not any(f.owner is not None and f.data is None for f in src._flights.values())

    run_jumping(go)


def test_queued_read_ahead_never_takes_the_request_slots_a_miss_needs() -> None:
    """Read-ahead waits for its own slots before it takes a request slot: 20 queued one-chunk
    prefetch runs left a reader's miss waiting for all of them (they held every request slot
    while queued on the read-ahead limiter)."""
    gate = trio.Event()
    remote = _GatedAhead(BLOB, 20 * CS, gate)

    async def go() -> None:
        async with serving(_source(remote, None, max_requests=4, request_bytes=CS)) as src:
            src.prefetch(0, 20 * CS)  # 20 runs; 2 may stream (4 - the reserved 2), all held at the gate
            await trio.sleep(0.1)
            with trio.move_on_after(2):
                assert await src.read_range(40 * CS, 40 * CS + 10) == BLOB[40 * CS : 40 * CS + 10]
                gate.set()
            assert gate.is_set(), "the miss waited behind queued read-ahead"

    run_jumping(go)


def test_prefetch_with_request_bytes_is_one_long_request(tmp_path: Path) -> None:
    """cp's start of a directory: one stream for the whole range, not request_bytes pieces."""
    remote = FakeRemote(BLOB)

    async def go() -> None:
        async with serving(_source(remote, CacheDir(tmp_path / "c"), request_bytes=2 * CS)) as src:
            src.prefetch(0, 20 * CS, request_bytes=20 * CS)
            assert await src.read_range(19 * CS, 20 * CS) == BLOB[19 * CS : 20 * CS]
            src.prefetch(20 * CS, 26 * CS)  # without it: the usual requests of 2 chunks
            await src.read_range(25 * CS, 26 * CS)

    run(go)
    assert sorted((s // CS, e // CS) for s, e, _ in remote.requests) == [(0, 20), (20, 22), (22, 24), (24, 26)]


def test_fill_as_read_ahead_caps_its_requests(tmp_path: Path) -> None:
    remote = FakeRemote(BLOB)

    async def go() -> None:
        async with serving(_source(remote, CacheDir(tmp_path / "c"), request_bytes=2 * CS)) as src:
            fetched = await src.fill([(0, 30 * CS)], ahead=True, request_bytes=10 * CS)
            assert fetched == 30 * CS
            assert src.stats.ahead_chunks == 30

    run(go)
    assert sorted((s // CS, e // CS) for s, e, _ in remote.requests) == [(0, 10), (10, 20), (20, 30)]


def test_readers_in_order_at_once_share_the_read_ahead_and_never_lose_it_unread() -> None:
    """8 readers in order, slower than the network, each with a full window, would land 8 windows
    ahead into a memory tier of 2: chunks evicted before they were read, fetched again here (a
    memory-only store), read back from the disk with a cache (2026-12-07: 700 of 768 chunks).
    With the windows shared, every byte is fetched once."""
    blob = random.Random(8).randbytes(8 * 32 * CS)
    remote = FakeRemote(blob, block_bytes=CS)
    region = len(blob) // 8

    async def go() -> None:
        async with serving(_source(remote, None, memory_bytes=32 * CS, ahead_bytes=16 * CS)) as src:

            async def reader(k: int) -> None:
                hint = ReadHint(k * region, (k + 1) * region)
                for pos in range(k * region, (k + 1) * region, CS):
                    assert await src.read_range(pos, pos + CS, hint) == blob[pos : pos + CS]
                    await trio.sleep(0.01)  # the reader is the slow side

            async with trio.open_nursery() as nursery:
                for k in range(8):
                    nursery.start_soon(reader, k)
            assert max(e - s for s, e, _ in remote.requests) > CS  # it did read ahead
            assert sum(e - s for s, e, _ in remote.requests) == len(blob)  # nothing fetched twice

    run_jumping(go)


def test_the_window_cap_divides_among_active_readers_and_comes_back(tmp_path: Path) -> None:
    remote = FakeRemote(BLOB)

    async def go() -> None:
        src = _source(remote, None, memory_bytes=16 * CS, ahead_bytes=16 * CS)
        async with serving(src):
            a, b = ReadHint(0, 32 * CS), ReadHint(32 * CS, len(BLOB))
            for i in range(3):  # a reads in order: alone, it may have the whole window
                await src.read_range(i * CS, (i + 1) * CS, a)
            assert src.window_cap(a) == 16 * CS
            for i in range(32, 35):  # b too: half the memory tier, shared by two
                await src.read_range(i * CS, (i + 1) * CS, b)
            assert src.window_cap(a) == src.window_cap(b) == 4 * CS
            await src.read_range(45 * CS, 46 * CS, b)  # b seeks: a is alone again
            assert src.window_cap(a) == 16 * CS
            for i in range(46, 49):
                await src.read_range(i * CS, (i + 1) * CS, b)
            assert src.window_cap(a) == 4 * CS
            await trio.sleep(2.0)  # b stopped reading: its share comes back
            assert src.window_cap(a) == 16 * CS
            await src.read_range(3 * CS, 4 * CS, a)  # both read again, a first
            for i in range(49, 51):
                await src.read_range(i * CS, (i + 1) * CS, b)
            assert src.window_cap(a) == 4 * CS
            await trio.sleep(0.6)
            await src.read_range(4 * CS, 5 * CS, a)  # only a goes on ...
            await trio.sleep(0.6)
            assert src.window_cap(a) == 16 * CS  # ... so b, idle for 1.2 s behind it, left the budget

    run_jumping(go)
