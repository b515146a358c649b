"""A corpus of hostile indexes: each is refused with InvalidArchive and its own message, either at
open or before the entry is used; nothing else (IndexError, struct.error, ...) ever escapes."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import struct
from collections.abc import Callable
from pathlib import Path

import flatbuffers
import pytest

from blobmount.errors import InvalidArchive, NotFound
from blobmount.index import EntryRecord, IndexView, build_index
from blobmount.index._fb import index_generated as fb
from tests.support.helpers import FIXTURES

H = hashlib.sha256(b"x").digest()


def rec(path: bytes, offset: int = 0, size: int = 1, original: int | None = None, comp: int = 0) -> EntryRecord:
    return EntryRecord(path, offset, size, size if original is None else original, H, 0o644, 0, 0, 0, comp)


def index_of(*records: EntryRecord, data_size: int = 100) -> bytes:
    return build_index(list(records), data_size, hashlib.sha256(b"d").digest())


def raw_index(
    *,
    version: int | None = None,
    hash_algorithm: int | None = None,
    path: bytes | None = b"a",
    digest: bytes | None = H,
    compression: int = 0,
    with_entries: bool = True,
) -> bytes:
    """One-entry index built field by field, so required fields can be left out."""
    b = flatbuffers.Builder(256)
    offs = []
    if with_entries:
        p = b.CreateString(path) if path is not None else None
        h = b.CreateByteVector(digest) if digest is not None else None
        fb.EntryStart(b)
        if p is not None:
            fb.EntryAddPath(b, p)
        fb.EntryAddDataSize(b, 1)
        fb.EntryAddOriginalSize(b, 1)
        if h is not None:
            fb.EntryAddHash(b, h)
        b.PrependInt8Slot(9, compression, 0)
        offs.append(fb.EntryEnd(b))
        fb.IndexStartEntriesVector(b, len(offs))
        for o in reversed(offs):
            b.PrependUOffsetTRelative(o)
        vec = b.EndVector()
    fb.IndexStart(b)
    if version is not None:
        b.PrependUint32Slot(0, version, 1)
    if hash_algorithm is not None:
        b.PrependInt8Slot(1, hash_algorithm, 0)
    if with_entries:
        fb.IndexAddEntries(b, vec)
    fb.IndexAddDataSize(b, 100)
    b.Finish(fb.IndexEnd(b))
    return bytes(b.Output())


def patch_u32(buf: bytes, pos: int, value: int) -> bytes:
    out = bytearray(buf)
    struct.pack_into("<I", out, pos, value)
    return bytes(out)


def entries_vector_pos(buf: bytes) -> int:
    """Position of the entries vector's length field in a reference-built index."""
    root = struct.unpack_from("<I", buf, 0)[0]
    vt = root - struct.unpack_from("<i", buf, root)[0]
    field = root + struct.unpack_from("<H", buf, vt + 8)[0]
    pos: int = field + struct.unpack_from("<I", buf, field)[0]
    return pos


BASIC = (FIXTURES / "basic" / "index.blob").read_bytes()

# (name, index bytes, phrase the one-line message must contain); refused at open
AT_OPEN: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty buffer", lambda: b"", "outside the 0-byte index"),
    ("root offset past the end", lambda: struct.pack("<I", 1000) + bytes(8), "root table"),
    ("vtable before the buffer", lambda: struct.pack("<Ii", 4, 1 << 20) + bytes(8), "vtable"),
    (
        "vtable size odd",
        lambda: patch_u32(raw_index(), 0, 4)[:4] + struct.pack("<i", -4) + struct.pack("<HH", 5, 4),
        "vtable size",
    ),
    ("version 2", lambda: raw_index(version=2), "unsupported version 2"),
    ("hash algorithm 1", lambda: raw_index(hash_algorithm=1), "unsupported hash_algorithm 1"),
    ("entries missing", lambda: raw_index(with_entries=False), "required field 'entries' is missing"),
    ("entries length huge", lambda: patch_u32(BASIC, entries_vector_pos(BASIC), 0x3FFFFFFF), "entries"),
    ("entry offset outside", lambda: patch_u32(BASIC, entries_vector_pos(BASIC) + 4, 0x7FFFFFF0), "entry 0"),
    ("duplicate paths", lambda: index_of(rec(b"b"), rec(b"a"), rec(b"b")), "duplicate path 'b'"),
    ("truncated to half", lambda: BASIC[: len(BASIC) // 2], "outside"),
]


@pytest.mark.parametrize(("name", "make", "phrase"), AT_OPEN, ids=[c[0] for c in AT_OPEN])
def test_refused_at_open(name: str, make: Callable[[], bytes], phrase: str) -> None:
    with pytest.raises(InvalidArchive) as info:
        IndexView(make())
    assert phrase in str(info.value)
    assert "\n" not in str(info.value)


# refused when the entry is used (lazily): (name, records, path looked up, phrase)
PER_ENTRY: list[tuple[str, list[EntryRecord], int, str]] = [
    ("dot-dot", [rec(b"../x")], 0, "escapes the archive root"),
    ("absolute", [rec(b"/etc/passwd")], 0, "absolute path"),
    ("NUL", [rec(b"a\x00b")], 0, "NUL byte"),
    ("double slash", [rec(b"a//b")], 0, "empty path component"),
    ("trailing slash", [rec(b"a/")], 0, "trailing '/'"),
    ("dot component", [rec(b"a/./b")], 0, "'.' component"),
    ("long name", [rec(b"n" * 256)], 0, "name of 256 bytes exceeds 255"),
    ("file and dir", [rec(b"a"), rec(b"a/b", offset=1)], 0, "both a file and a directory"),
    ("file and dir, byte order", [rec(b"a"), rec(b"a-x", 1), rec(b"a/b", 2)], 0, "both a file and a directory"),
    ("past the data blob", [rec(b"a", offset=99, size=2)], 0, "runs past the 100-byte data blob"),
    ("offset overflow", [rec(b"a", offset=(1 << 64) - 1, size=1)], 0, "runs past"),
    ("raw size mismatch", [rec(b"a", size=5, original=6)], 0, "data_size 5 but original_size 6"),
    ("original 2^63", [rec(b"a", size=5, original=1 << 63, comp=1)], 0, "exceeds 2^63-1"),
    ("zstd without data", [rec(b"a", size=0, original=5, comp=1)], 0, "stores no data"),
]


@pytest.mark.parametrize(("name", "records", "number", "phrase"), PER_ENTRY, ids=[c[0] for c in PER_ENTRY])
def test_refused_before_use(name: str, records: list[EntryRecord], number: int, phrase: str) -> None:
    view = IndexView(index_of(*records), blob_size=100)
    with pytest.raises(InvalidArchive) as info:
        view.entry(number)
    assert phrase in str(info.value)
    with pytest.raises(InvalidArchive):
        view.check_all()


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda: raw_index(digest=None), "required field 'hash' is missing"),
        (lambda: raw_index(path=None), "required field 'path' is missing"),
        (lambda: raw_index(digest=b"short"), "hash has 5 bytes"),
        (lambda: raw_index(compression=7), "unknown compression 7"),
    ],
)
def test_raw_entry_faults(make: Callable[[], bytes], phrase: str) -> None:
    view = IndexView(make(), blob_size=100)
    with pytest.raises(InvalidArchive) as info:
        view.entry(0)
    assert phrase in str(info.value)


def test_data_size_must_match_the_blob() -> None:
    with pytest.raises(InvalidArchive, match="does not match the data blob's 50 bytes"):
        IndexView(index_of(rec(b"a")), blob_size=50)


@pytest.mark.expect_log(r"^blobmount\.index\.view: entry \d+: .*; skipped$")
def test_listing_skips_bad_entries_and_keeps_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    view = IndexView(index_of(rec(b"a"), rec(b"a/b", 1), rec(b"a//c", 2), rec(b"ok", 3)), blob_size=100)
    with caplog.at_level(logging.WARNING):
        names = {c.name: c.is_dir for c in view.children(b"")}
    assert names == {b"ok": False}  # 'a' is both a file and a directory: neither side is listed
    assert [c.name for c in view.children(b"a")] == [b"b"]  # 'a//c' is skipped one level down
    assert "both a file and a directory" in caplog.text
    with pytest.raises(InvalidArchive, match="both a file and a directory"):
        view.kind(b"a")
    assert view.kind(b"ok") == 3
    with pytest.raises(NotFound):
        view.resolve(b"missing")


def test_every_truncation_and_random_bytes_end_in_invalid_archive() -> None:
    for cut in range(len(BASIC)):
        try:
            view = IndexView(BASIC[:cut], blob_size=8375)
            view.check_all()
        except InvalidArchive:
            continue
    rng = random.Random(1)
    for _ in range(500):
        blob = rng.randbytes(rng.randrange(0, 300))
        with contextlib.suppress(InvalidArchive):
            IndexView(blob, blob_size=100).check_all()


def test_neither_order_is_searched_through_a_permutation() -> None:
    records = [rec(b"b", 0), rec(b"a/x", 1), rec(b"c", 2), rec(b"0", 3)]
    view = IndexView(index_of(*records), blob_size=100)
    assert view.order.value == "neither"
    for i, r in enumerate(records):
        assert view.find(r.path) == i
    assert [c.name for c in view.children(b"")] == [b"0", b"a", b"b", b"c"]


def test_walk_order_archive_is_fully_searchable(tmp_path: Path) -> None:
    view = IndexView((FIXTURES / "unicode" / "index.blob").read_bytes(), blob_size=13295)
    assert view.order.value == "walk"
    for i in range(len(view)):
        assert view.find(view.entry(i).path) == i


# -- FlatBuffers structure: vtables and offsets that point where they must not -------------------


def patch_i32(buf: bytes, pos: int, value: int) -> bytes:
    out = bytearray(buf)
    struct.pack_into("<i", out, pos, value)
    return bytes(out)


def patch_u16(buf: bytes, pos: int, value: int) -> bytes:
    out = bytearray(buf)
    struct.pack_into("<H", out, pos, value)
    return bytes(out)


def root_vtable(buf: bytes) -> tuple[int, int]:
    """(root table position, its vtable position) of an index."""
    root = struct.unpack_from("<I", buf, 0)[0]
    return root, root - struct.unpack_from("<i", buf, root)[0]


def entry_table(buf: bytes, i: int) -> tuple[int, int]:
    """(table position, vtable position) of entry `i`."""
    elem = entries_vector_pos(buf) + 4 + 4 * i
    table = elem + struct.unpack_from("<I", buf, elem)[0]
    return table, table - struct.unpack_from("<i", buf, table)[0]


def aliased_entries(count: int) -> bytes:
    """An index whose `count` entries all point at one table: a tiny buffer claiming many files."""
    b = flatbuffers.Builder(4 * count + 256)
    p = b.CreateString(b"same")
    h = b.CreateByteVector(H)
    fb.EntryStart(b)
    fb.EntryAddPath(b, p)
    fb.EntryAddHash(b, h)
    table = fb.EntryEnd(b)
    fb.IndexStartEntriesVector(b, count)
    for _ in range(count):
        b.PrependUOffsetTRelative(table)
    vec = b.EndVector()
    fb.IndexStart(b)
    fb.IndexAddEntries(b, vec)
    b.Finish(fb.IndexEnd(b))
    return bytes(b.Output())


STRUCTURE: list[tuple[str, Callable[[], bytes], str]] = [
    ("root vtable past the end", lambda: patch_i32(BASIC, root_vtable(BASIC)[0], -len(BASIC)), "vtable"),
    ("root vtable size past the end", lambda: patch_u16(BASIC, root_vtable(BASIC)[1], 0xFFFE), "vtable"),
    ("root vtable size zero", lambda: patch_u16(BASIC, root_vtable(BASIC)[1], 0), "vtable size 0"),
    (
        "data_size field outside the buffer",
        lambda: patch_u16(BASIC, root_vtable(BASIC)[1] + 4 + 2 * 3, 0xFFF0),
        "index: data_size",
    ),
    (
        "entries field outside the buffer",
        lambda: patch_u16(BASIC, root_vtable(BASIC)[1] + 4 + 2 * 2, 0xFFF0),
        "index: entries",
    ),
    (
        "entries vector offset outside",
        lambda: patch_u32(
            BASIC,
            root_vtable(BASIC)[0] + struct.unpack_from("<H", BASIC, root_vtable(BASIC)[1] + 8)[0],
            0x7FFFFF00,
        ),
        "index: entries",
    ),
    ("entry vtable before the buffer", lambda: patch_i32(BASIC, entry_table(BASIC, 0)[0], 1 << 30), "entry 0"),
    ("entry vtable past the end", lambda: patch_i32(BASIC, entry_table(BASIC, 0)[0], -(1 << 30)), "entry 0"),
    (
        "entry path string length past the end",
        lambda: _patch_path_length(BASIC, 0, 0x7FFFFFFF),
        "runs past the index end",
    ),
    ("entry offset zero (points at itself)", lambda: patch_u32(BASIC, entries_vector_pos(BASIC) + 4, 0), "entry 0"),
    ("100,000 entries aliasing one table", lambda: aliased_entries(100_000), "duplicate path 'same'"),
]


def _patch_path_length(buf: bytes, i: int, value: int) -> bytes:
    table, vt = entry_table(buf, i)
    field = table + struct.unpack_from("<H", buf, vt + 4)[0]
    string = field + struct.unpack_from("<I", buf, field)[0]
    return patch_u32(buf, string, value)


@pytest.mark.parametrize(("name", "make", "phrase"), STRUCTURE, ids=[c[0] for c in STRUCTURE])
def test_structure_faults_are_refused_with_their_own_message(name: str, make: Callable[[], bytes], phrase: str) -> None:
    """Refused at open, or (for one entry's fields) before that entry is used; never another
    exception, never a read outside the buffer."""
    buf = make()
    with pytest.raises(InvalidArchive) as info:
        IndexView(buf).check_all()
    assert phrase in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_entry_offset_pointing_at_the_root_table_is_not_an_entry() -> None:
    """Type confusion: entry 0's offset re-aimed at the Index table itself."""
    root, _ = root_vtable(BASIC)
    elem = entries_vector_pos(BASIC) + 4
    buf = patch_u32(BASIC, elem, (root - elem) % (1 << 32))  # uoffsets cannot point backwards
    with pytest.raises(InvalidArchive):
        IndexView(buf).check_all()


def test_overlapping_and_shared_ranges_are_allowed_and_checked_per_entry() -> None:
    """Two entries may share stored bytes (nothing in the format forbids it); each is checked
    on its own, and a range that overflows 64 bits is refused, never wrapped."""
    view = IndexView(
        index_of(
            rec(b"a", offset=0, size=10),
            rec(b"b", offset=5, size=10),  # overlaps a
            rec(b"c", offset=0, size=10),  # the same bytes as a
            rec(b"d", offset=1 << 63, size=1 << 63, original=1, comp=1),  # 2^64: must not wrap to 0
        ),
        blob_size=100,
    )
    assert [view.entry(i).data_offset for i in range(3)] == [0, 5, 0]
    with pytest.raises(InvalidArchive, match="runs past"):
        view.entry(3)


def test_entry_layouts_kept_stay_bounded_whatever_the_vtables() -> None:
    """The one-read entry layouts are kept per vtable position; an index whose every entry has a
    vtable of its own (a builder shares them; a hostile one need not) must not grow that memory
    with its entries: past the bound, layouts are worked out each time, answers unchanged."""
    from blobmount.index import view as view_module

    records = [
        EntryRecord(f"d/f{i:05d}".encode(), 0, 0, 0, hashlib.sha256(b"").digest(), 0o644, 0, 0, i, 0) for i in range(64)
    ]
    view = IndexView(build_index(records, 0, hashlib.sha256(b"").digest()), blob_size=0)
    bound = view_module._LAYOUTS_KEPT
    for vt in range(bound * 3):  # every position of the buffer taken for a vtable: most are nonsense
        view._layout_at(vt % max(len(view._buf) - 4, 1))
    assert len(view._layouts) <= bound
    assert all(view._entry_fast(i) == view._entry_checked(i) for i in range(len(view)))
