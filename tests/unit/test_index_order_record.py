"""The entry order kept by index digest: a remount skips the scan and finds the same entries; a
record that does not fit the index is ignored, never trusted into wrong lookups."""

from __future__ import annotations

import pytest

from blobmount.index import IndexView, Order
from blobmount.index.build import EntryRecord, build_index
from tests.support.helpers import FIXTURES


def _entries(paths: list[bytes]) -> bytes:
    records = [EntryRecord(p, 0, 0, 0, b"\x00" * 32, 0o644, 0, 0, 0, 0) for p in paths]
    return build_index(records, data_size=0, data_hash=b"\x00" * 32)


@pytest.mark.parametrize(
    ("paths", "order"),
    [
        ([b"a", b"b/c", b"d"], Order.BYTES),
        ([b"a/b", b"a b", b"a-b"], Order.WALK),
        ([b"z", b"a", b"m/x"], Order.NEITHER),
    ],
)
def test_a_kept_record_gives_the_same_order_and_lookups(paths: list[bytes], order: Order) -> None:
    buf = _entries(paths)
    first = IndexView(buf)
    assert first.order is order
    again = IndexView(buf, known_order=first.order_record())
    assert again.order is order
    for i, p in enumerate(paths):
        assert again.find(p) == first.find(p) == i


@pytest.mark.parametrize("record", [b"bogus\n", b"neither\n\x01\x00", b"bytes\nextra", b"neither\n" + b"\xff" * 12])
def test_a_record_that_does_not_fit_is_ignored(record: bytes) -> None:
    buf = _entries([b"z", b"a", b"m/x"])
    view = IndexView(buf, known_order=record)
    assert view.order is Order.NEITHER
    assert [view.find(p) for p in (b"z", b"a", b"m/x")] == [0, 1, 2]


def test_fixtures_keep_their_order() -> None:
    buf = (FIXTURES / "unicode" / "index.blob").read_bytes()
    view = IndexView(buf)
    assert IndexView(buf, known_order=view.order_record()).order is view.order
