"""Large zstd files are served while they decode: one decode per file, shared by its readers, bytes
as soon as the decoder has passed them, verified at the end with the guarantees of lazily verified
raw files (a read that completes a bad file fails, a retry gets right bytes).

Real mounts of an archive on the real docker-registry, behind tests/support/faults.py's FaultProxy where a
fault (a stall, a flipped bit) or a request count is needed. ``--verify-threshold 256K`` makes the
files here progressive; ``--log-level info`` makes each decode start one log line, which the tests
count. Each file sits between pads, so a fault aimed at one file never lands in another's chunks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from blobmount.reference import Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support.corpus import Placed, Spec, write_archive
from tests.support.faults import Fault, FaultProxy, Kind, blob
from tests.support.mounts import Mount, mounted
from tests.support.reads import read_bounded
from tests.support.servers import Registry
from tests.support.zstdstream import DECODE_LINE, RANDOM_BYTES, TEXT_BYTES, text

pytestmark = pytest.mark.fuse

MiB = 1 << 20
REPO = "zstd/stream:v1"
TIMEOUT_S = 3.0
GUARD_S = 90.0  # hang guard for one read (the machine may be loaded)
ARGS = ("--verify-threshold", "256K", "--timeout", str(TIMEOUT_S), "--log-level", "info")


@dataclass(frozen=True, slots=True)
class StreamArchive:
    placed: dict[bytes, Placed]
    data_digest: str


@pytest.fixture(scope="module")
def stream_archive(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> StreamArchive:
    rng = random.Random(25)
    specs = [
        Spec(b"pad-0", bytes(2 * MiB)),
        Spec(b"text.txt", text(TEXT_BYTES, 1), zstd=True),
        Spec(b"pad-1", bytes(2 * MiB)),
        Spec(b"random.bin", rng.randbytes(RANDOM_BYTES), zstd=True),
        Spec(b"pad-2", bytes(2 * MiB)),
    ]
    out = tmp_path_factory.mktemp("stream-archive")
    placed = write_archive(out, specs)
    assert placed[b"text.txt"].data_size > 8 * MiB  # more than one request's worth of frame
    ref = Reference.parse(f"{registry.host}/{REPO}")
    trio.run(functools.partial(push_archive, out, ref, RegistryOptions()))
    digest = "sha256:" + hashlib.sha256((out / "data.blob").read_bytes()).hexdigest()
    return StreamArchive(placed, digest)


def _mount(proxy: FaultProxy, tmp_path: Path, *extra: str) -> contextlib.AbstractContextManager[Mount]:
    return mounted(f"{proxy.host}/{REPO}", tmp_path / "mnt", *ARGS, *extra, cache_dir=tmp_path / "cache")


def _data_ranges(proxy: FaultProxy, arc: StreamArchive) -> list[tuple[int, int]]:
    """Range requests for the data blob the proxy saw, as [start, end)."""
    out = []
    for method, path, headers in list(proxy.state.seen):
        value = headers.get("range")
        if method == "GET" and value and arc.data_digest in path:
            first, last = (int(x) for x in value.removeprefix("bytes=").split("-"))
            if (first, last) != (0, 0):
                out.append((first, last + 1))
    return out


def _decodes(m: Mount, name: str) -> int:
    return sum(1 for line in m.log().splitlines() if f"'{name}': {DECODE_LINE}" in line)


def _verified(path: Path) -> bytes:
    return os.getxattr(path, "user.blobmount.verified")


def _wait(cond: Callable[[], object], what: str, guard_s: float = GUARD_S) -> None:
    deadline = time.monotonic() + guard_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _tmp_files(cache: Path) -> list[Path]:
    return list(cache.rglob("*.tmp"))


def _content_files(cache: Path) -> list[Path]:
    return [f for f in (cache / "content").rglob("*") if f.is_file() and not f.name.endswith(".tmp")]


def test_a_reader_ahead_of_the_decoder_waits_then_gets_right_bytes(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path
) -> None:
    data = stream_archive.placed[b"text.txt"].data
    with _mount(fault_proxy, tmp_path) as m:
        path = m.path / "text.txt"
        first = read_bounded(path, GUARD_S, 0, 4096)
        assert first.data == data[:4096]
        assert _verified(path) == b"unverified"  # served before the end was decoded
        at = TEXT_BYTES - 3 * MiB
        far = read_bounded(path, GUARD_S, at, MiB)
        assert far.data == data[at : at + MiB]
        whole = read_bounded(path, GUARD_S)
        assert whole.data == data
        _wait(lambda: _verified(path) == b"verified", "never verified")
        assert _decodes(m, "text.txt") == 1, m.log()[-3000:]
        log = m.log()
    assert "Traceback" not in log, log


def test_a_file_decoded_into_the_store_leaves_its_frame_out_of_the_chunk_cache(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path
) -> None:
    """The decoded file goes to the content store; its compressed frame is not written to the
    chunk cache as well (a second copy that is never read, and a write per byte of it)."""
    p = stream_archive.placed[b"text.txt"]
    cache = tmp_path / "cache"
    with _mount(fault_proxy, tmp_path) as m:
        path = m.path / "text.txt"
        assert read_bounded(path, GUARD_S).data == p.data
        _wait(lambda: _verified(path) == b"verified", "never verified")
        _wait(lambda: _content_files(cache), "the verified file never reached the store")
        chunks = sum(f.stat().st_size for f in (cache / "chunks").rglob("*") if f.is_file())
        assert chunks < MiB, (chunks, p.data_size)  # the frame is more than 8 MiB
        assert read_bounded(path, GUARD_S, 5 * MiB, MiB).data == p.data[5 * MiB : 6 * MiB]
        assert _decodes(m, "text.txt") == 1  # later opens: from the store
        assert "Traceback" not in m.log()


def test_a_reader_ahead_of_a_stalled_decode_fails_in_time_and_the_next_read_is_right(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path
) -> None:
    """The frame's bytes stall past a point: a reader waiting beyond it gets EIO after about
    --timeout (never a hang), the reader before it is served, and once the origin answers again a
    read there gets the right bytes."""
    arc = stream_archive
    p = arc.placed[b"text.txt"]
    at = p.data_offset + p.data_size * 6 // 10
    with _mount(fault_proxy, tmp_path) as m:
        path = m.path / "text.txt"
        stall = fault_proxy.add(Fault(Kind.STALL, blob(arc.data_digest, at, at + 1), stall_s=60.0))
        assert read_bounded(path, GUARD_S, 0, MiB).data == p.data[:MiB]
        far = TEXT_BYTES - 2 * MiB
        t0 = time.monotonic()
        out = read_bounded(path, GUARD_S, far, 4096)
        waited = time.monotonic() - t0
        assert out.errno == 5, out  # EIO
        assert waited >= TIMEOUT_S * 0.8, waited
        assert waited < GUARD_S / 2, waited
        assert stall.hits >= 1, "the stall was never met"
        fault_proxy.clear()
        _wait(lambda: read_bounded(path, GUARD_S, far, 4096).data == p.data[far : far + 4096], "never right")
        assert "Traceback" not in m.log()


def test_two_readers_at_different_offsets_share_one_decode(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path
) -> None:
    """Two processes' reads (one from the start, one from the middle) are served by one decode:
    one decode line, and the frame crosses the network once."""
    arc = stream_archive
    p = arc.placed[b"text.txt"]
    with _mount(fault_proxy, tmp_path) as m:
        path = m.path / "text.txt"
        fault_proxy.state.seen.clear()
        results: dict[str, bytes | None] = {}

        def run(name: str, offset: int, size: int | None) -> None:
            results[name] = read_bounded(path, GUARD_S, offset, size).data

        half = TEXT_BYTES // 2
        threads = [
            threading.Thread(target=run, args=("head", 0, None)),
            threading.Thread(target=run, args=("middle", half, 8 * MiB)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(GUARD_S)
        assert results["head"] == p.data
        assert results["middle"] == p.data[half : half + 8 * MiB]
        assert _decodes(m, "text.txt") == 1, m.log()[-3000:]
        fetched = sum(b - a for a, b in _data_ranges(fault_proxy, arc))
        assert fetched <= p.data_size + 2 * MiB, (fetched, p.data_size)  # chunk-aligned: one decode's worth
        _wait(lambda: _verified(path) == b"verified", "never verified")
        assert "Traceback" not in m.log()


def test_a_mismatch_found_at_the_end_of_the_decode_fails_the_read_and_a_retry_is_right(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path
) -> None:
    """One bit flipped in transit inside a raw zstd block: the frame decodes, the first bytes are
    served (unverified), the read that reaches the end fails with EIO, and the file, read again
    from the origin, is then right and verified."""
    arc = stream_archive
    p = arc.placed[b"random.bin"]
    at = p.data_offset + p.data_size // 2
    with _mount(fault_proxy, tmp_path) as m:
        path = m.path / "random.bin"
        flip = fault_proxy.add(Fault(Kind.FLIP, blob(arc.data_digest, at, at + 1), times=1, at=at))
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == p.data[:4096]
            assert _verified(path) == b"unverified"
            pos, failed = 4096, False
            for _ in range(RANDOM_BYTES // (128 << 10) + 2):
                try:
                    block = os.pread(fd, 128 << 10, pos)
                except OSError as exc:
                    failed = exc.errno == 5  # EIO
                    break
                if not block:
                    break
                pos += len(block)
            assert failed, "a read of a file that failed verification ended with success (or not EIO)"
            assert pos > RANDOM_BYTES // 2, pos  # the bytes before the end were served as decoded
        finally:
            os.close(fd)
        assert flip.hits == 1, "the flip was never met"
        fault_proxy.clear()
        _wait(lambda: read_bounded(path, GUARD_S).data == p.data, "a retry never got the right bytes")
        assert _verified(path) == b"verified"
        log = m.log()
    assert "'random.bin'" in log, log
    assert "sha256 mismatch" in log or "corrupt zstd frame" in log, log
    assert "poisoned" not in log, log
    assert "Traceback" not in log, log


def test_a_file_larger_than_the_store_streams_through_a_window_and_a_reader_behind_it_restarts(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path
) -> None:
    """--cache-size 16M holds neither the decoded 48 MiB nor a temp file of it: the decode runs
    through a bounded window (4 MiB); a read far behind it starts another decode."""
    p = stream_archive.placed[b"text.txt"]
    with _mount(fault_proxy, tmp_path, "--cache-size", "16M") as m:
        path = m.path / "text.txt"
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = 0
            for _ in range(40 * MiB // (128 << 10)):  # read 40 MiB in order
                assert os.pread(fd, 128 << 10, pos) == p.data[pos : pos + (128 << 10)]
                pos += 128 << 10
            assert "through a 4194304-byte window" in m.log()
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel's pages: the read reaches us
            assert os.pread(fd, 4096, MiB) == p.data[MiB : MiB + 4096]  # far behind the window
        finally:
            os.close(fd)
        assert "behind the decode window" in m.log()
        assert _decodes(m, "text.txt") == 2
        assert read_bounded(path, GUARD_S).data == p.data
        _wait(lambda: _verified(path) == b"verified", "never verified")
        cached = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*") if f.is_file())
        assert cached <= 16 * MiB + MiB, cached
        assert not _tmp_files(tmp_path / "cache")
        assert "Traceback" not in m.log()


def test_every_reader_gone_mid_decode_stops_it_cleanly_and_the_next_read_works(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path
) -> None:
    """Two opens that read a part each and close while the decode is slowed by a dripping source:
    the decode stops (its temp file goes, with its reserved space), and the next reader gets the
    right bytes, a verified file, and later opens are served from the store."""
    arc = stream_archive
    p = arc.placed[b"text.txt"]
    at = p.data_offset + p.data_size * 7 // 10
    with _mount(fault_proxy, tmp_path) as m:
        path = m.path / "text.txt"
        drip = fault_proxy.add(Fault(Kind.DRIP, blob(arc.data_digest, at, at + 1), rate_bps=256 << 10))
        fds = [os.open(path, os.O_RDONLY) for _ in range(2)]
        assert os.pread(fds[0], 4096, 0) == p.data[:4096]
        assert os.pread(fds[1], 4096, 5 * MiB) == p.data[5 * MiB : 5 * MiB + 4096]
        _wait(lambda: _tmp_files(tmp_path / "cache"), "no decode under way")
        for fd in fds:
            os.close(fd)
        _wait(lambda: not _tmp_files(tmp_path / "cache"), "the decode's temp file outlived its readers")
        assert drip.hits >= 1, "the decode never reached the slow part"
        fault_proxy.clear()
        assert read_bounded(path, GUARD_S).data == p.data
        _wait(lambda: _verified(path) == b"verified", "never verified")
        _wait(lambda: _content_files(tmp_path / "cache"), "the verified file never reached the store")
        assert not _tmp_files(tmp_path / "cache")
        assert _decodes(m, "text.txt") == 2
        # verified and kept: another open is served from the store, no third decode
        assert read_bounded(path, GUARD_S, 20 * MiB, MiB).data == p.data[20 * MiB : 21 * MiB]
        assert _decodes(m, "text.txt") == 2
        assert "Traceback" not in m.log()


def test_strict_keeps_verify_before_serve(
    fault_proxy: FaultProxy, stream_archive: StreamArchive, tmp_path: Path
) -> None:
    p = stream_archive.placed[b"text.txt"]
    with _mount(fault_proxy, tmp_path, "--verify", "strict") as m:
        path = m.path / "text.txt"
        assert read_bounded(path, GUARD_S, 0, 4096).data == p.data[:4096]
        assert _verified(path) == b"verified"  # the first byte came after the whole file checked out
        assert _decodes(m, "text.txt") == 0
