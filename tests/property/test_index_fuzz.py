"""Mutated fixture indexes (bit flips, truncations, splices of offsets) either fail with the one
clear error or read consistently: lookup finds the entry, its parent lists it, its bytes verify or
fail cleanly. No other exception, no hang (an alarm per example guards against loops)."""

from __future__ import annotations

import hashlib
import os
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobmount.cache import ContentStore
from blobmount.errors import IntegrityError, InvalidArchive, LimitExceeded, SourceError
from blobmount.index import Entry, EntryRecord, IndexView, build_index
from blobmount.reader import Reader
from blobmount.sources.local import LocalFileSource
from tests.support.helpers import FIXTURES

EXAMPLES = int(os.environ.get("BLOBMOUNT_FUZZ_EXAMPLES", "2000"))
HANG_GUARD_S = 10
SOURCES = {name: (FIXTURES / name / "index.blob").read_bytes() for name in ("basic", "unicode")}
CLEAN = (InvalidArchive, IntegrityError, LimitExceeded, SourceError)


class Hang(Exception):
    pass


@contextmanager
def hang_guard() -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"example ran longer than {HANG_GUARD_S} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(HANG_GUARD_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SOURCES)))
    buf = bytearray(SOURCES[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "u32"]))
        if not buf:
            break
        pos = draw(st.integers(0, len(buf) - 1))
        if kind == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "splice":
            src = draw(st.integers(0, len(buf) - 1))
            length = draw(st.integers(1, 16))
            buf[pos : pos + length] = buf[src : src + length]
        elif pos + 4 <= len(buf):
            struct.pack_into("<I", buf, pos, draw(st.sampled_from([0, 1, 4, 0x7FFFFFFF, 0xFFFFFFFF, len(buf)])))
    return name, bytes(buf)


def check_consistent(view: IndexView, reader: Reader) -> None:
    for i in range(len(view)):
        try:
            mtime = view.mtime_ns(i)  # the directory-time read: refused cleanly, or the entry's own
        except InvalidArchive:
            mtime = None
        try:
            entry = view.entry(i)
        except InvalidArchive:
            continue
        assert mtime == entry.mtime_ns
        found = view.find(entry.path)
        assert found is not None
        assert view.entry(found).path == entry.path
        parent, _, name = entry.path.rpartition(b"/")
        assert name in {c.name for c in view.children(parent)}

        async def read(e: Entry) -> bytes:
            return b"".join([b async for b in reader.stream_verified(e)])

        try:
            data = trio.run(read, entry)
        except CLEAN:
            continue
        assert hashlib.sha256(data).digest() == entry.hash


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=mutated())
@pytest.mark.expect_log(r"^blobmount\.index\.view: ", r"^blobmount\.reader: ")
def test_mutated_indexes_fail_cleanly_or_read_consistently(
    case: tuple[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> None:
    name, buf = case
    data = LocalFileSource(FIXTURES / name / "data.blob")
    try:
        with hang_guard():
            try:
                view = IndexView(buf, blob_size=data.size)
            except InvalidArchive as exc:
                message = str(exc)
                assert message
                assert "\n" not in message
                return
            fast_path_agrees(view)
            store = ContentStore(tmp_path_factory.getbasetemp() / "fuzz-cache", max_bytes=1 << 30)
            check_consistent(view, Reader(data, store))
    finally:
        data.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=mutated())
def test_the_inlined_entry_read_agrees_with_the_checked_one(case: tuple[str, bytes]) -> None:
    """IndexView.entry reads a well-formed entry in one pass (_entry_fast) and falls back to the
    field-by-field reads (_entry_checked) for the error: on any mutation the fast read either
    gives up or returns exactly what the checked read returns (never an entry it would refuse)."""
    name, buf = case
    try:
        view = IndexView(buf, blob_size=len((FIXTURES / name / "data.blob").read_bytes()))
    except InvalidArchive:
        return
    with hang_guard():
        for i in range(len(view)):
            fast = view._entry_fast(i)
            try:
                checked = view._entry_checked(i)
            except InvalidArchive:
                assert fast is None, i
                continue
            assert fast in (None, checked), i


def test_the_inlined_entry_read_takes_every_well_formed_entry() -> None:
    for name, buf in SOURCES.items():
        view = IndexView(buf, blob_size=len((FIXTURES / name / "data.blob").read_bytes()))
        assert all(view._entry_fast(i) == view._entry_checked(i) for i in range(len(view))), name


def fast_path_agrees(view: IndexView) -> None:
    """entry()'s one-pass read (_entry_fast) never returns an entry the field-by-field check
    (_entry_checked) refuses, and returns the same values when it answers at all (it gives up to
    let the check name what is wrong)."""
    for i in range(len(view)):
        fast = view._entry_fast(i)
        try:
            checked = view._entry_checked(i)
        except InvalidArchive:
            assert fast is None, (i, fast)
            continue
        assert fast in (None, checked), (i, fast, checked)


# -- structured target: well-formed FlatBuffers whose every field is hostile ----------------------

_H = hashlib.sha256(b"x").digest()
_PATHS = [b"a", b"a/b", b"a/b/c", b"b", b"../x", b"/x", b"a//b", b"a/", b"a\x00b", b"", b".", b"a/./b", b"n" * 256]
_BIG = [2**63 - 1, 2**63, 2**64 - 1]


def _one_line(exc: BaseException) -> None:
    assert str(exc)
    assert "\n" not in str(exc)


@st.composite
def hostile_records(draw: st.DrawFn) -> tuple[list[EntryRecord], int]:
    blob = draw(st.integers(0, 1000))
    records = []
    for _ in range(draw(st.integers(0, 10))):
        path = draw(st.one_of(st.sampled_from(_PATHS), st.binary(max_size=10)))
        offset = draw(st.one_of(st.integers(0, blob), st.sampled_from(_BIG)))
        size = draw(st.one_of(st.integers(0, blob), st.sampled_from(_BIG)))
        original = draw(st.one_of(st.just(size), st.integers(0, 2**64 - 1)))
        digest = draw(st.one_of(st.just(_H), st.binary(max_size=40)))
        mode = draw(st.integers(0, 2**32 - 1))
        comp = draw(st.sampled_from([0, 1, 2, -1, 127]))
        records.append(EntryRecord(path, offset, size, original, digest, mode, 0, 0, 0, comp))
    return records, blob


@settings(max_examples=EXAMPLES // 4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=hostile_records())
@pytest.mark.expect_log(r"^blobmount\.index\.view: entry \d+: .*; skipped$")
def test_hostile_fields_are_refused_or_safe(case: tuple[list[EntryRecord], int]) -> None:
    """Every entry is either refused with InvalidArchive or safe to serve: a valid path that
    lookups find and its parent lists, a 32-byte hash, a known compression, a size a file can
    have, and a data range inside the blob."""
    from blobmount.index.paths import path_problem

    records, blob = case
    with hang_guard():
        try:
            view = IndexView(build_index(records, blob, _H), blob_size=blob)
        except InvalidArchive as exc:
            _one_line(exc)
            return
        fast_path_agrees(view)
        for i in range(len(view)):
            try:
                entry = view.entry(i)
            except InvalidArchive as exc:
                _one_line(exc)
                continue
            assert path_problem(entry.path) is None
            assert len(entry.hash) == 32
            assert entry.compression in (0, 1)
            assert entry.original_size < 2**63
            assert entry.data_offset + entry.data_size <= blob
            if entry.compression == 0:
                assert entry.data_size == entry.original_size
            assert view.kind(entry.path) == i
            parent, _, name = entry.path.rpartition(b"/")
            assert name in {c.name for c in view.children(parent)}
