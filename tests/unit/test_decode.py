"""The progressive zstd decode (blobmount/decode.py) through the Reader, on a local archive: reads at
odd offsets across the ring's wrap, a reader behind the window restarting, a decode stopped when its
readers leave, and the content store taking the verified file. The mounted behaviour (faults,
several processes, the registry) is tests/fuse/test_zstd_stream.py."""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from blobmount import decode, hashing, rangestream, readahead
from blobmount.cache import ContentStore
from blobmount.cache.content import TRAILER_BYTES, Pending
from blobmount.errors import IntegrityError, SourceError
from blobmount.index import Entry, IndexView
from blobmount.readahead import ReadHint
from blobmount.reader import Reader, ReaderConfig
from blobmount.sources.local import open_directory
from tests.support.corpus import Spec, write_archive

MiB = 1 << 20


def _text(size: int) -> bytes:
    rng = random.Random(size)
    words = [bytes(rng.choices(b"abcdefghijklmnop", k=rng.randint(1, 9))) for _ in range(3000)]
    return b" ".join(rng.choices(words, k=size // 4))[:size]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("decode-archive")
    data = _text(12 * MiB + 333)
    write_archive(out, [Spec(b"a.txt", data, zstd=True), Spec(b"bad.txt", data, zstd=True, hash=bytes(32))])
    return out


async def _with_reader(archive: Path, cache: Path, cache_size: int, body: object) -> None:
    source = open_directory(archive)
    view = IndexView(source.index_bytes, blob_size=source.data.size)
    entries = {e.path: e for e in view.entries()}
    reader = Reader(source.data, ContentStore(cache, cache_size), ReaderConfig(verify_threshold=MiB, wait_s=30))
    async with trio.open_nursery() as nursery:
        reader.attach(nursery)
        await body(reader, entries)  # type: ignore[operator]
        nursery.cancel_scope.cancel()


def test_ring_reads_across_the_wrap_and_a_reader_behind_restarts(archive: Path, tmp_path: Path) -> None:
    """--cache-size 8M: the 12 MiB file goes through a 4 MiB ring; reads of odd sizes in order are
    right across every wrap; a read far behind starts a second decode and is right too."""
    want = _text(12 * MiB + 333)

    async def body(reader: Reader, entries: dict[bytes, object]) -> None:
        entry = entries[b"a.txt"]
        handle = await reader.open(entry)  # type: ignore[arg-type]
        pos = 0
        while pos < len(want):
            got = await reader.read(handle, pos, 300_001)
            assert got == want[pos : pos + 300_001], pos
            pos += len(got)
        first = handle.decode
        assert first is not None
        assert first.ring
        assert await reader.read(handle, 1000, 5000) == want[1000:6000]  # behind the window
        assert handle.decode is not first  # a second decode served it
        assert reader.state(entry) == "verified"  # type: ignore[arg-type]
        reader.close(handle)

    trio.run(_with_reader, archive, tmp_path / "c", 8 * MiB, body)
    assert decode.window_for(8 * MiB) == 4 * MiB


@pytest.mark.expect_log("sha256 mismatch: .*reading it again from the origin")
def test_store_takes_the_verified_file_and_a_mismatch_fails_the_completing_read(archive: Path, tmp_path: Path) -> None:
    want = _text(12 * MiB + 333)

    async def body(reader: Reader, entries: dict[bytes, object]) -> None:
        entry = entries[b"a.txt"]
        handle = await reader.open(entry)  # type: ignore[arg-type]
        far = await reader.read(handle, 10 * MiB, 4096)  # ahead of the decoder: waits, then right
        assert far == want[10 * MiB : 10 * MiB + 4096]
        assert await reader.read(handle, len(want) - 10, 100) == want[-10:]  # the verdict, good
        reader.close(handle)
        for _ in range(100):  # the commit follows the verdict
            again = await reader.open(entry)  # type: ignore[arg-type]
            if again.content_fd is not None:
                reader.close(again)
                break
            reader.close(again)
            await trio.sleep(0.05)
        else:
            pytest.fail("the verified file never reached the store")
        bad = entries[b"bad.txt"]
        handle = await reader.open(bad)  # type: ignore[arg-type]
        assert await reader.read(handle, 0, 100) == want[:100]  # served before the verdict
        with pytest.raises(IntegrityError):
            await reader.read(handle, len(want) - 100, 100)
        with pytest.raises(IntegrityError):  # an open from before the mismatch stays failed
            await reader.read(handle, 0, 100)
        reader.close(handle)

    trio.run(_with_reader, archive, tmp_path / "c", 1 << 30, body)


def test_a_decode_whose_readers_left_stops_and_gives_its_space_back(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped or finished (a local 12 MiB decode may beat the stop), it leaves no temp file."""
    monkeypatch.setattr("blobmount.streaming.LINGER_S", 0.0)

    async def body(reader: Reader, entries: dict[bytes, object]) -> None:
        entry = entries[b"a.txt"]
        handle = await reader.open(entry)  # type: ignore[arg-type]
        await reader.read(handle, 0, 100)
        dec = handle.decode
        assert dec is not None
        reader.close(handle)
        with trio.fail_after(30):
            await dec.done.wait()
        assert dec.error is None or isinstance(dec.error, rangestream.Stopped)
        for _ in range(100):
            if not list((tmp_path / "c").rglob("*.tmp")):
                break
            await trio.sleep(0.05)
        assert not list((tmp_path / "c").rglob("*.tmp"))

    trio.run(_with_reader, archive, tmp_path / "c", 1 << 30, body)


def test_the_store_temp_file_of_a_decode_is_allocated_once_its_first_bytes_are_out(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """preallocate() allocates the blocks of the temp file a decode writes (fallocate: cheaper
    writes than into a sparse file), keeping the size the budget reserved; a decode into the store
    calls it once, from its hashing thread, after its first block was written (never before the
    first byte)."""
    size = 8 * MiB + 5

    async def alone() -> None:
        store = ContentStore(tmp_path / "alone", 64 * MiB)
        pending = await store.begin("ab" * 32, size)
        assert os.fstat(pending.fd).st_blocks == 0  # sparse until preallocated
        await trio.to_thread.run_sync(ContentStore.preallocate, pending)
        st = os.fstat(pending.fd)
        assert st.st_size == size + TRAILER_BYTES
        assert st.st_blocks * 512 >= size, st.st_blocks  # allocated, not a hole
        await store.abort(pending)
        os.close(pending.fd)
        assert not list((tmp_path / "alone").rglob("*.tmp"))

    trio.run(alone)

    want = _text(12 * MiB + 333)
    calls: list[bytes] = []
    real = ContentStore.preallocate

    def spy(pending: Pending) -> None:
        calls.append(os.pread(pending.fd, 4096, 0))  # what the file holds when it is called
        real(pending)

    monkeypatch.setattr(ContentStore, "preallocate", staticmethod(spy))

    async def body(reader: Reader, entries: dict[bytes, object]) -> None:
        entry = entries[b"a.txt"]
        handle = await reader.open(entry)  # type: ignore[arg-type]
        assert await reader.read(handle, len(want) - 10, 100) == want[-10:]
        reader.close(handle)

    trio.run(_with_reader, archive, tmp_path / "c", 1 << 30, body)
    assert calls == [want[:4096]]


class _TimedSource:
    """A remote-like source (no read_range_sync) that records each read's size; `delay_s` per read."""

    def __init__(self, data: bytes, delay_s: float) -> None:
        self.data = data
        self.delay_s = delay_s
        self.asked: list[int] = []

    @property
    def size(self) -> int:
        return len(self.data)

    async def read_range(self, start: int, end: int, hint: object = None) -> bytes:
        self.asked.append(end - start)
        if self.delay_s:
            await trio.sleep(self.delay_s)
        return self.data[start:end]

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("delay_s", [0.0, 1.0])
def test_the_frame_is_read_in_growing_hops_while_they_are_fast(delay_s: float) -> None:
    """The decoder reads the frame from the trio thread in hops of 1 MiB doubling to INPUT_BYTES
    while each comes back fast (fewer waits for the trio thread); over a slow link every hop stays
    1 MiB, so no read asks it for more than it delivers within --timeout. Trio's mock clock."""
    src = _TimedSource(bytes(range(256)) * (100_000), delay_s)
    got = bytearray()

    def drain() -> None:
        stream = rangestream.RangeStream(src, 0, src.size)
        buf = bytearray(decode.INPUT_BYTES)
        for _ in range(8):
            n = stream.readinto(buf)
            got.extend(buf[:n])

    async def go() -> None:
        await trio.to_thread.run_sync(drain)

    trio.run(go, clock=trio.testing.MockClock(autojump_threshold=0))
    assert bytes(got) == src.data[: len(got)]
    if delay_s < rangestream.INPUT_FAST_S:
        assert src.asked[:5] == [MiB, 2 * MiB, 4 * MiB, 8 * MiB, 8 * MiB], src.asked
    else:
        assert src.asked == [MiB] * 8, src.asked


def _remote_reader(archive: Path, cache: Path, timed: _TimedSource) -> tuple[Reader, dict[bytes, Entry]]:
    """A Reader over the archive's data blob served by `timed`, a remote-like source (so a
    decode reads it through a Feed), its content store large enough for every file."""
    source = open_directory(archive)
    view = IndexView(source.index_bytes, blob_size=source.data.size)
    config = ReaderConfig(verify_threshold=MiB, wait_s=30)
    return Reader(timed, ContentStore(cache, 1 << 30), config), {e.path: e for e in view.entries()}


def test_the_frame_is_fed_to_the_decoder_in_chunk_reads_in_order_and_a_failed_read_fails_the_decode(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode from a remote source reads its frame through a Feed: in order, in reads that end
    on FEED_STEP_BYTES boundaries, ahead of the decoder, the first alone, the second with a
    read-ahead of FEED_FIRST_AHEAD_BYTES; the file comes out right. A read of the
    frame that fails fails the decode with that error (the reader gets it), it never hangs."""
    monkeypatch.setattr(decode, "FEED_STEP_BYTES", 256 << 10)
    want = _text(12 * MiB + 333)
    timed = _TimedSource((archive / "data.blob").read_bytes(), 0.0)
    reader, entries = _remote_reader(archive, tmp_path / "c", timed)
    entry = entries[b"a.txt"]
    spans: list[tuple[int, int]] = []
    ahead: list[tuple[int, int] | None] = []
    real_read = timed.read_range

    async def read_range(start: int, end: int, hint: object = None) -> bytes:
        if len(spans) < 2:  # what the fetcher's read-ahead makes of the first reads (fetch.py)
            assert isinstance(hint, ReadHint)
            ahead.append(readahead.advance(dataclasses.replace(hint), start, end, True, MiB, 32 * MiB))
        spans.append((start, end))
        return await real_read(start, end, hint)

    timed.read_range = read_range  # type: ignore[method-assign]

    async def ok() -> None:
        async with trio.open_nursery() as nursery:
            reader.attach(nursery)
            handle = await reader.open(entry)
            got = bytearray()
            with trio.fail_after(60):
                while len(got) < len(want):
                    got += await reader.read(handle, len(got), MiB)
            assert got == want
            reader.close(handle)
            nursery.cancel_scope.cancel()

    trio.run(ok)
    start, end = entry.data_offset, entry.data_offset + entry.data_size
    assert spans[0][0] == start, spans[:2]
    assert spans[-1][1] == end, spans[-2:]
    assert all(a == b for (_, a), (b, _) in itertools.pairwise(spans)), "in order, no gap, no overlap"
    assert all(b % (256 << 10) == 0 for _, b in spans[:-1]), spans  # chunk-aligned reads,
    assert max(b - a for a, b in spans) <= 256 << 10, spans  # a chunk each
    # the first chunk comes alone; the second read has the fetcher read FEED_FIRST_AHEAD_BYTES ahead
    assert ahead == [None, (spans[1][1], min(end, spans[1][1] + decode.FEED_FIRST_AHEAD_BYTES))], ahead

    async def failing(start: int, end: int, hint: object = None) -> bytes:
        if start >= entry.data_offset + (512 << 10):
            raise SourceError("bytes refused on purpose")
        return await real_read(start, end, hint)

    timed.read_range = failing  # type: ignore[method-assign]
    reader2, _ = _remote_reader(archive, tmp_path / "c2", timed)

    async def broken() -> None:
        async with trio.open_nursery() as nursery:
            reader2.attach(nursery)
            handle = await reader2.open(entry)
            with trio.fail_after(60), pytest.raises(SourceError, match="refused on purpose"):
                await reader2.read(handle, 8 * MiB, MiB)
            reader2.close(handle)
            nursery.cancel_scope.cancel()

    trio.run(broken)


def test_fresh_bytes_are_views_of_the_decoders_buffers_and_a_kept_view_keeps_its_bytes(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads near the decoder's front come as views of its held buffers (no copy); a buffer goes
    back to the decoder only once no view of it is alive. With 2 held blocks and 3 buffers, a
    reader that keeps every view it got makes the decoder reuse buffers many times over 12 MiB:
    every kept view still holds its bytes at the end (a reused one would hold later bytes)."""
    monkeypatch.setattr(decode, "HOLD_BLOCKS", 2)
    monkeypatch.setattr(hashing, "BUFFERS", 3)
    monkeypatch.setattr(decode, "FEED_STEP_BYTES", 64 << 10)  # the decoder a little ahead at most
    want = _text(12 * MiB + 333)
    timed = _TimedSource((archive / "data.blob").read_bytes(), 0.002)
    reader, entries = _remote_reader(archive, tmp_path / "c", timed)
    entry = entries[b"a.txt"]
    kept: list[tuple[int, bytes | memoryview]] = []

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            reader.attach(nursery)
            handle = await reader.open(entry)
            pos = 0
            with trio.fail_after(60):
                while pos < len(want):
                    data = await reader.read_view(handle, pos, MiB)
                    kept.append((pos, data))
                    pos += len(data)
            assert reader.state(entry) == "verified"
            reader.close(handle)
            nursery.cancel_scope.cancel()

    trio.run(body)
    views = [data for _, data in kept if isinstance(data, memoryview)]
    assert len(views) >= 4, [type(d).__name__ for _, d in kept]
    for pos, data in kept:
        assert data == want[pos : pos + len(data)], pos
    assert decode._unexported(bytearray(8))
    held = bytearray(8)
    part = memoryview(held)[2:6][1:]  # derived from a view that is gone: still an export
    assert not decode._unexported(held)
    assert bytes(part) == b"\0\0\0"
    assert len(held) == 8
