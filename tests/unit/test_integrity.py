"""The one rule for bytes that do not check out (blobmount/integrity/, Integrity.from_origin):
read once more, then poison; a fault that happens once never poisons a file. Each kind of file
that is verified before it is served goes through it: a small raw file, a small zstd file (decoded
in memory), a larger zstd file (decoded into the content store). A fault-injecting source over
the fixture's real data blob: the fault path is what is tested here; the same guarantees through
a real registry and a real mount are tests/fuse/test_mounted.py and test_network_faults.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from blobmount.cache import ContentStore
from blobmount.errors import IntegrityError
from blobmount.index import COMPRESSION_ZSTD, Entry, IndexView
from blobmount.readahead import ReadHint
from blobmount.reader import Reader
from blobmount.smallfiles import SMALL_DECODE_BYTES
from blobmount.sources.local import LocalFileSource, open_directory
from tests.support.aio import run

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "go-reference"


class FlippingSource:
    """The data blob with one byte of `entry` flipped in the first `times` reads that cover it
    (async only, as a registry is); counts the reads that did."""

    def __init__(self, inner: LocalFileSource, entry: Entry, times: int) -> None:
        self.inner = inner
        self.at = entry.data_offset + entry.data_size // 2
        self.times = times
        self.covering = 0

    @property
    def size(self) -> int:
        return self.inner.size

    async def read_range(self, start: int, end: int, hint: ReadHint | None = None) -> bytes:
        data = await self.inner.read_range(start, end, hint)
        if start <= self.at < end:
            self.covering += 1
            if self.covering <= self.times:
                flipped = bytearray(data)
                flipped[self.at - start] ^= 0x01
                return bytes(flipped)
        return data

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()


def _pick(view: IndexView, kind: str) -> Entry:
    """A file of the fixture that is verified whole before it is served, of one kind."""
    for number in range(len(view)):
        e = view.entry(number)
        zstd = e.compression == COMPRESSION_ZSTD
        small = 0 < e.original_size <= SMALL_DECODE_BYTES
        if (kind == "small-raw" and small and not zstd) or (kind == "small-zstd" and small and zstd):
            return e
        if kind == "large-zstd" and zstd and e.original_size > SMALL_DECODE_BYTES:
            return e
    raise AssertionError(f"the fixture has no {kind} file")


def _reader(tmp_path: Path, kind: str, times: int) -> tuple[Reader, Entry, FlippingSource, bytes]:
    archive = open_directory(FIXTURES / "mixed")
    assert isinstance(archive.data, LocalFileSource)
    view = IndexView(archive.index_bytes, blob_size=archive.data.size)
    entry = _pick(view, kind)
    source = FlippingSource(archive.data, entry, times)
    # verified before it is served: the whole file is at most the threshold
    reader = Reader(source, ContentStore(tmp_path / "store"))
    assert reader.integrity.upfront(entry)
    right = run(archive.data.read_range, entry.data_offset, entry.data_offset + entry.data_size)
    return reader, entry, source, right


async def _read_all(reader: Reader, entry: Entry) -> bytes:
    handle = await reader.open(entry)
    try:
        return await reader.read(handle, 0, entry.original_size + 1)
    finally:
        reader.close(handle)


KINDS = ["small-raw", "small-zstd", "large-zstd"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.expect_log(r"reading it again$")
def test_a_fault_once_is_read_again_and_the_right_bytes_are_served(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader, entry, source, _ = _reader(tmp_path, kind, times=1)
    with caplog.at_level(logging.WARNING, logger="blobmount.reader"):
        data = run(_read_all, reader, entry)
    assert len(data) == entry.original_size
    assert reader.state(entry) == "verified"
    assert source.covering == 2  # the faulty read and the one more
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert entry.hash.hex() not in warnings[0], warnings
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.expect_log(r"reading it again$", r"sha256 mismatch: expected|corrupt zstd frame")
def test_bad_bytes_read_twice_poison_the_file_with_one_line_naming_both_hashes(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader, entry, source, _ = _reader(tmp_path, kind, times=1_000)
    with caplog.at_level(logging.WARNING, logger="blobmount.reader"), pytest.raises(IntegrityError):
        run(_read_all, reader, entry)
    assert reader.state(entry) == "poisoned"
    assert source.covering == 2  # once more, then poisoned
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert entry.hash.hex() in errors[0], errors
    with pytest.raises(IntegrityError, match="failed verification earlier"):
        run(_read_all, reader, entry)  # poisoned: not read again
    assert source.covering == 2
