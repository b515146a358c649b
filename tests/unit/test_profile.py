"""Prefetch profiles (profile.py): what a recording keeps, how hostile documents are refused, and
how a profile becomes few data-blob ranges in recorded order. The registry and FUSE side is
tests/fuse/test_profiles.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blobmount import profile
from blobmount.create import CreateOptions, create_archive
from blobmount.errors import InvalidArchive
from blobmount.index import Entry, IndexView
from blobmount.profile import SCHEMA, Recorder, parse, plan


def _view(tmp_path: Path, compression: str = "none") -> IndexView:
    src = tmp_path / "src"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
        for i in range(10):
            (src / d / f"f{i:02}").write_bytes(bytes([i]) * 3000)
    (src / "big.bin").write_bytes(os.urandom(5 << 20))
    out = tmp_path / "out"
    create_archive(src, out, CreateOptions(compression=compression))
    return IndexView((out / "index.blob").read_bytes(), blob_size=(out / "data.blob").stat().st_size)


def _entry(view: IndexView, path: bytes) -> Entry:
    return view.entry(view.resolve(path))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_first_reads_are_recorded_in_order_once_and_large_files_by_range(tmp_path: Path) -> None:
    view = _view(tmp_path)
    rec = Recorder()
    b3, a1, big = _entry(view, b"b/f03"), _entry(view, b"a/f01"), _entry(view, b"big.bin")
    rec.read(b3, 0, 3000)
    rec.read(a1, 0, 1000)
    rec.read(b3, 1000, 2000)  # again: not recorded twice
    for off in range(0, 2 << 20, 128 << 10):  # big.bin read in order: one growing entry
        rec.read(big, off, off + (128 << 10))
    rec.read(big, 4 << 20, (4 << 20) + 10)  # a seek: a new entry
    doc = rec.document("sha256:" + "0" * 64, created="2026-12-02T00:00:00Z")
    assert doc["entries"] == [
        ["b/f03", 0, 3000],
        ["a/f01", 0, 3000],
        ["big.bin", 0, 2 << 20],
        ["big.bin", 4 << 20, 1 << 20],
    ]
    assert parse(profile.dumps(doc)).entries[0] == (b"b/f03", 0, 3000)


def test_recording_is_bounded_in_time_entries_and_bytes(tmp_path: Path) -> None:
    view = _view(tmp_path)
    files = [_entry(view, f"a/f{i:02}".encode()) for i in range(10)]
    clock = Clock()
    rec = Recorder(seconds=5, clock=clock)
    rec.read(files[0], 0, 1)
    clock.now = 6
    rec.read(files[1], 0, 1)
    assert len(rec.entries) == 1
    assert rec.stopped
    assert "record-seconds" in rec.stopped
    rec = Recorder(max_entries=3)
    for f in files:
        rec.read(f, 0, 1)
    assert len(rec.entries) == 3
    assert rec.stopped
    rec = Recorder(max_bytes=2 * (5 + profile.ENTRY_OVERHEAD_BYTES))
    for f in files:
        rec.read(f, 0, 1)
    assert len(rec.entries) == 2
    assert rec.stopped


def _doc(entries: object, **over: object) -> bytes:
    doc: dict[str, object] = {"schema": SCHEMA, "created": "2026-12-02T00:00:00Z", "index_digest": "sha256:x"}
    doc["entries"] = entries
    doc.update(over)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"x" * (profile.MAX_PROFILE_BYTES + 1), "larger than"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (_doc([], schema="other"), "schema"),
        (_doc("nope"), "not a list"),
        (_doc([["a", -1, 5]]), "entry 0"),
        (_doc([["a", 0, True]]), "entry 0"),
        (_doc([["a", 0]]), "entry 0"),
        (_doc([[1, 0, 5]]), "entry 0"),
        (_doc([["a" * 5000, 0, 1]]), "longer than"),
        (_doc([], created=5), "created"),
        (_doc([["a", 0, 1]] * (profile.MAX_ENTRIES + 1)), "more than"),
    ],
)
def test_hostile_documents_are_refused_in_one_line(data: bytes, says: str) -> None:
    with pytest.raises(InvalidArchive) as info:
        parse(data, "prefetch profile X")
    message = str(info.value)
    assert says in message
    assert "\n" not in message
    assert len(message) < 300


def test_a_plan_ignores_what_the_archive_lacks_and_merges_neighbours(tmp_path: Path) -> None:
    view = _view(tmp_path)
    entries = [[f"a/f{i:02}", 0, 3000] for i in range(10)] + [
        ["nope/x", 0, 10],
        ["a", 0, 10],  # a directory
        ["big.bin", 64 << 20, 10],  # past its end
        ["../../etc/passwd", 0, 10],
        ["big.bin", 0, 1 << 20],
    ]
    chosen = plan(view, parse(_doc(entries)), budget_bytes=1 << 30)
    assert chosen.used == 11
    assert chosen.ignored == 4
    a0, a9, big = _entry(view, b"a/f00"), _entry(view, b"a/f09"), _entry(view, b"big.bin")
    run = (a0.data_offset, a9.data_offset + a9.data_size)
    assert [r for batch in chosen.batches for r in batch] == sorted(
        [run, (big.data_offset, big.data_offset + (1 << 20))]
    )


def test_a_plan_keeps_recorded_order_between_batches_and_stops_at_the_budget(tmp_path: Path) -> None:
    view = _view(tmp_path)
    entries = [["b/f00", 0, 3000], ["a/f00", 0, 3000], ["big.bin", 0, 5 << 20]]
    chosen = plan(view, parse(_doc(entries)), budget_bytes=1 << 30, batch_bytes=1)
    starts = [batch[0][0] for batch in chosen.batches]
    b0, a0 = _entry(view, b"b/f00"), _entry(view, b"a/f00")
    assert starts[:2] == [b0.data_offset, a0.data_offset]  # b first, as recorded
    small = plan(view, parse(_doc(entries)), budget_bytes=7000)
    assert small.total_bytes <= 7000
    assert len([r for b in small.batches for r in b]) == 2


def test_compressed_files_are_planned_whole(tmp_path: Path) -> None:
    view = _view(tmp_path, compression="zstd")
    a1 = _entry(view, b"a/f01")
    chosen = plan(view, parse(_doc([["a/f01", 100, 5]])), budget_bytes=1 << 30)
    assert chosen.batches == [[(a1.data_offset, a1.data_offset + a1.data_size)]]


def test_the_mount_flags_and_profile_push_take_settings_from_every_layer() -> None:
    """`profile push` is a nested subcommand: its registry flags come from BLOBMOUNT_* too (they
    were left None, and `profile push` failed with a TypeError, before nested parsers were layered)."""
    from blobmount.cli.parser import build_parser
    from blobmount.settings import resolve

    env = {"BLOBMOUNT_PREFETCH_PROFILE": "auto", "BLOBMOUNT_RECORD_PROFILE": "1", "BLOBMOUNT_TIMEOUT": "7"}
    args = resolve(build_parser(), ["mount", "src", "mnt"], env).args
    assert (args.prefetch_profile, args.record_profile, args.timeout) == ("auto", True, 7.0)
    args = resolve(build_parser(), ["profile", "push", "reg/x:v1", "p.json"], env).args
    assert args.timeout == 7.0
    assert args.max_connections == 8  # the default, filled in
    assert resolve(build_parser(), ["cache", "prune", "--cache-dir", "/c"], {}).args.size == "0"


def test_the_unmount_recording_is_a_meta_record_of_the_cache(tmp_path: Path) -> None:
    from blobmount.cache import CacheDir, MetaStore

    meta = MetaStore(CacheDir(tmp_path / "cache"))
    hexd = "ab" * 32
    doc = {"schema": SCHEMA, "created": "2026-12-02T00:00:00Z", "index_digest": f"sha256:{hexd}", "entries": []}
    path = meta.put_profile(hexd, profile.dumps(doc))
    assert path == tmp_path / "cache" / "meta" / "profiles" / f"{hexd}.json"  # the README's documented place
    assert parse(path.read_bytes()).index_digest == f"sha256:{hexd}"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left beside it
    with pytest.raises(OSError):
        meta.put_profile("../../etc/x", b"{}")  # a name that is not a digest never becomes a path
