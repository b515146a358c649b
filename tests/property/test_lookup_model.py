"""kind()/find()/children() agree with a brute-force model on random trees, in byte order, walk order
and neither: names that continue a directory's name with bytes below '/' are generated on purpose."""

from __future__ import annotations

import hashlib
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from blobmount.index import Entry, EntryRecord, IndexView, build_index

H = hashlib.sha256(b"").digest()
NAMES = [b"a", b"a-b", b"a.b", b"a b", b"a0", b"ab", b"b", b"B", b"\xc3\xa9", b"z"]


@st.composite
def trees(draw: st.DrawFn) -> list[bytes]:
    paths: set[bytes] = set()
    for _ in range(draw(st.integers(1, 25))):
        depth = draw(st.integers(1, 3))
        paths.add(b"/".join(draw(st.sampled_from(NAMES)) for _ in range(depth)))
    files = sorted(paths)
    # drop file/dir conflicts: a path that is also a prefix of another
    return [p for p in files if not any(q.startswith(p + b"/") for q in files)]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(files=trees(), order=st.sampled_from(["bytes", "walk", "neither"]), seed=st.integers(0, 1000))
def test_lookups_match_the_model(files: list[bytes], order: str, seed: int) -> None:
    if order == "walk":
        files = sorted(files, key=lambda p: p.replace(b"/", b"\x00"))
    elif order == "neither":
        random.Random(seed).shuffle(files)
    view = IndexView(build_index([EntryRecord(p, 0, 0, 0, H, 0o644, 0, 0, 0, 0) for p in files], 0, H), blob_size=0)
    dirs = {b""} | {p.rsplit(b"/", i)[0] for p in files for i in range(1, p.count(b"/") + 1)}
    candidates = set(files) | dirs | {p + b"x" for p in files} | {d + b"-" for d in dirs if d} | {b"a/", b"nope"}
    for path in candidates:
        want = files.index(path) if path in files else (-1 if path in dirs else None)
        assert view.kind(path) == want, path
    for d in dirs:
        prefix = d + b"/" if d else b""
        children = {p[len(prefix) :].split(b"/")[0] for p in files if p.startswith(prefix)}
        assert {c.name for c in view.children(d)} == children, d


@settings(max_examples=200, deadline=None, derandomize=True)
@given(files=trees(), order=st.sampled_from(["bytes", "walk", "neither"]), seed=st.integers(0, 1000))
def test_listings_from_remembered_extents_match_cold_ones(files: list[bytes], order: str, seed: int) -> None:
    """A walk lists each directory after its parent, from the extent the parent's listing found
    (IndexView._extents), with each file's entry (child_entries): the same children, entries and
    resume positions as a listing in a view that never listed anything, from every position."""
    if order == "walk":
        files = sorted(files, key=lambda p: p.replace(b"/", b"\x00"))
    elif order == "neither":
        random.Random(seed).shuffle(files)
    blob = build_index([EntryRecord(p, 0, 0, 0, H, 0o644, 0, 0, 0, 0) for p in files], 0, H)
    warm = IndexView(blob, blob_size=0)
    pending = [b""]
    while pending:
        d = pending.pop(0)
        listed = list(warm.child_entries(d))
        cold = list(IndexView(blob, blob_size=0).children(d))
        assert [c for c, _ in listed] == cold, d
        prefix = d + b"/" if d else b""
        for child, entry in listed:
            if child.is_dir:
                assert entry is None
                pending.append(prefix + child.name)
            else:
                assert isinstance(entry, Entry)
                assert entry == warm.entry(child.entry)
                assert entry.path == prefix + child.name
        for i, child in enumerate(cold):
            assert list(warm.children(d, child.next_pos)) == cold[i + 1 :], (d, child)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(files=trees(), order=st.sampled_from(["bytes", "walk", "neither"]), seed=st.integers(0, 1000))
def test_a_listing_resumed_anywhere_leaves_later_listings_right(files: list[bytes], order: str, seed: int) -> None:
    """A resume position is the kernel's directory offset, which seekdir(3) sets to anything: a
    listing resumed in the middle of a subdirectory's run must not remember that point as where
    the subdirectory starts (every later listing of it would lose its first names)."""
    if order == "walk":
        files = sorted(files, key=lambda p: p.replace(b"/", b"\x00"))
    elif order == "neither":
        random.Random(seed).shuffle(files)
    blob = build_index([EntryRecord(p, 0, 0, 0, H, 0o644, 0, 0, 0, 0) for p in files], 0, H)
    dirs = sorted({b""} | {p.rsplit(b"/", i)[0] for p in files for i in range(1, p.count(b"/") + 1)})
    cold = {d: list(IndexView(blob, blob_size=0).children(d)) for d in dirs}
    for d in dirs:
        for pos in range(len(files) + 1):
            warm = IndexView(blob, blob_size=0)
            list(warm.child_entries(d, pos))
            for sub in reversed(dirs):  # deepest first: a parent's listing from its start would mend it
                assert list(warm.children(sub)) == cold[sub], (d, pos, sub)
