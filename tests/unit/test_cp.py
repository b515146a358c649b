"""`blobmount cp` from local archives: where files land, what is refused before anything is
written, verification before the rename, DEST never escaped, modes, times and byte names."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from blobmount.cli import main
from blobmount.errors import NotFound
from blobmount.extract import CopyOptions, Item, directory_mtime_ns, plan
from blobmount.extract.pieces import cut_pieces, piece_bytes
from blobmount.extract.writer import File
from blobmount.index import Entry, IndexView
from tests.support.corpus import Spec, bomb_frame, compress, write_archive
from tests.support.helpers import FIXTURES, make_oci_layout, tree_files
from tests.support.hostile import build_hostile

MiB = 1 << 20
T0 = 1_600_000_000_123_456_789


def _files_under(root: Path) -> dict[bytes, bytes]:
    """Every file below `root` (bytes paths, relative), with its content; fails on anything else."""
    out: dict[bytes, bytes] = {}
    base = os.fsencode(root)
    for dirpath, _dirnames, filenames in os.walk(base):
        for name in filenames:
            full = os.path.join(dirpath, name)
            assert stat.S_ISREG(os.lstat(full).st_mode), full
            with open(full, "rb") as f:
                out[os.path.relpath(full, base)] = f.read()
    return out


def _no_temporaries(root: Path) -> None:
    for _, _, filenames in os.walk(os.fsencode(root)):
        assert not [n for n in filenames if n.startswith(b".blobmount-cp.")]


@pytest.mark.parametrize("name", ["mixed", "unicode", "basic", "empty"])
def test_the_whole_archive_is_the_tree(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out"
    assert main(["cp", str(FIXTURES / name), ".", str(dest)]) == 0
    want = {p: f.data for p, f in tree_files(name).items()}
    assert _files_under(dest) == want
    assert f"{len(want)} files" in capsys.readouterr().out


@pytest.mark.parametrize("form", ["dir:{}", "oci:{oci}:v1"])
def test_every_local_source_form(form: str, tmp_path: Path) -> None:
    oci = make_oci_layout(FIXTURES / "basic", tmp_path / "layout")
    dest = tmp_path / "out"
    assert main(["cp", form.format(FIXTURES / "basic", oci=oci), "/", str(dest)]) == 0
    assert _files_under(dest) == {p: f.data for p, f in tree_files("basic").items()}


def test_files_land_at_their_archive_path(tmp_path: Path) -> None:
    files = tree_files("basic")
    dest = tmp_path / "out"
    assert main(["cp", str(FIXTURES / "basic"), "a/x.json", "/small.txt", "empty.txt", str(dest)]) == 0
    assert _files_under(dest) == {p: files[p].data for p in (b"a/x.json", b"small.txt", b"empty.txt")}


def test_a_directory_lands_below_dest(tmp_path: Path) -> None:
    files = tree_files("basic")
    dest = tmp_path / "out"
    assert main(["cp", str(FIXTURES / "basic"), "a/", str(dest)]) == 0
    want = {p[2:]: f.data for p, f in files.items() if p.startswith(b"a/")}
    assert want
    assert _files_under(dest) == want


def test_a_missing_path_is_exit_3_and_nothing_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out"
    assert main(["cp", str(FIXTURES / "basic"), "small.txt", "no/such", str(dest)]) == 3
    err = capsys.readouterr().err
    assert "'no/such': no such file or directory in the archive" in err
    assert err.count("\n") == 1
    assert not dest.exists()
    dest.mkdir()
    assert main(["cp", str(FIXTURES / "basic"), "nope", str(dest), "--clean-dest"]) == 3
    assert list(dest.iterdir()) == []


def test_two_paths_one_of_them_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["cp", str(FIXTURES / "basic"), "a", "small.txt", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_existing_files_are_skipped_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = tree_files("basic")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "small.txt").write_bytes(b"mine")
    (dest / "a").mkdir()
    os.symlink("/etc/hostname", dest / "a" / "x.json")  # skipped as it is: never followed
    assert main(["cp", str(FIXTURES / "basic"), ".", str(dest)]) == 0
    assert "2 already there (skipped)" in capsys.readouterr().out
    assert (dest / "small.txt").read_bytes() == b"mine"
    assert os.readlink(dest / "a" / "x.json") == "/etc/hostname"
    assert (dest / "top.md").read_bytes() == files[b"top.md"].data
    assert main(["cp", str(FIXTURES / "basic"), ".", str(dest), "--overwrite"]) == 0
    assert _files_under(dest) == {p: f.data for p, f in files.items()}  # the link was replaced, not followed


def _modes_archive(tmp_path: Path) -> Path:
    arc = tmp_path / "arc"
    write_archive(
        arc,
        [
            Spec(b"d/one.sh", b"#!/bin/sh\n", mode=0o751, mtime_ns=T0),
            Spec(b"d/two.txt", b"two\n" * 100, zstd=True, mode=0o640, mtime_ns=T0 + 5_000),
            Spec(b"d/sub/deep.txt", b"deep", mode=0o4755, mtime_ns=T0 - 10),
            Spec(b"top.txt", b"top", mode=0o600, mtime_ns=T0 + 7),
        ],
    )
    return arc


def test_preserve_mode_and_times(tmp_path: Path) -> None:
    arc = _modes_archive(tmp_path)
    dest = tmp_path / "out"
    assert main(["cp", str(arc), ".", str(dest), "--preserve-mode", "--preserve-times"]) == 0
    for rel, mode, ns in [
        ("d/one.sh", 0o751, T0),
        ("d/two.txt", 0o640, T0 + 5_000),
        ("d/sub/deep.txt", 0o755, T0 - 10),  # set-id bits are never restored
        ("top.txt", 0o600, T0 + 7),
    ]:
        st = os.lstat(dest / rel)
        assert stat.S_IMODE(st.st_mode) == mode, rel
        assert st.st_mtime_ns == ns, rel
    # directories: the newest mtime of their direct files (the mount's rule)
    assert os.lstat(dest / "d").st_mtime_ns == T0 + 5_000
    assert os.lstat(dest / "d" / "sub").st_mtime_ns == T0 - 10


def test_a_directory_of_directories_takes_the_archives_creation_time(tmp_path: Path) -> None:
    """The mount's fallback: a local archive was created when its index.blob was written."""
    arc = tmp_path / "arc"
    write_archive(arc, [Spec(b"only/dirs/here/f.txt", b"f", mtime_ns=T0)])
    created = T0 - 3_600 * 10**9
    os.utime(arc / "index.blob", ns=(created, created))
    dest = tmp_path / "out"
    assert main(["cp", str(arc), ".", str(dest), "--preserve-times"]) == 0
    assert os.lstat(dest / "only" / "dirs" / "here").st_mtime_ns == T0
    assert os.lstat(dest / "only" / "dirs").st_mtime_ns == created
    assert os.lstat(dest / "only").st_mtime_ns == created


def test_without_preserve_modes_follow_the_umask_and_times_are_now(tmp_path: Path) -> None:
    arc = _modes_archive(tmp_path)
    dest = tmp_path / "out"
    old = os.umask(0o027)
    try:
        assert main(["cp", str(arc), ".", str(dest)]) == 0
    finally:
        os.umask(old)
    for rel in ("d/one.sh", "d/two.txt", "top.txt"):
        st = os.lstat(dest / rel)
        assert stat.S_IMODE(st.st_mode) == 0o640, rel
        assert st.st_mtime_ns > T0 + 10**17, rel


def test_directory_time_rule() -> None:
    assert directory_mtime_ns([3, 9, 4], created_ns=1) == 9
    assert directory_mtime_ns([], created_ns=42) == 42
    assert directory_mtime_ns([], created_ns=None) is None


def test_non_utf8_names_are_kept(tmp_path: Path) -> None:
    src = os.fsencode(tmp_path / "src")
    os.makedirs(os.path.join(src, b"d\xff\xfe"))
    with open(os.path.join(src, b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 name\n")
    with open(os.path.join(src, b"d\xff\xfe", b"\x80x"), "wb") as f:
        f.write(b"deeper\n" * 50)
    arc = tmp_path / "arc"
    assert main(["create", os.fsdecode(src), str(arc)]) == 0
    dest = tmp_path / "out"
    assert main(["cp", str(arc), ".", str(dest)]) == 0
    assert _files_under(dest) == {b"caf\xe9.txt": b"latin-1 name\n", b"d\xff\xfe/\x80x": b"deeper\n" * 50}
    dest2 = tmp_path / "out2"
    assert main(["cp", str(arc), os.fsdecode(b"d\xff\xfe"), str(dest2)]) == 0
    assert _files_under(dest2) == {b"\x80x": b"deeper\n" * 50}


def test_clean_dest_empties_first_without_following_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    dest = tmp_path / "out"
    (dest / "old" / "deeper").mkdir(parents=True)
    (dest / "old" / "deeper" / "stale").write_bytes(b"stale")
    (dest / "small.txt").write_bytes(b"mine")
    os.symlink(outside, dest / "link")
    assert main(["cp", str(FIXTURES / "basic"), ".", str(dest), "--clean-dest"]) == 0
    assert _files_under(dest) == {p: f.data for p, f in tree_files("basic").items()}
    assert (outside / "keep").read_bytes() == b"keep"


def test_clean_dest_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    basic = str(FIXTURES / "basic")
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (here / "precious").write_bytes(b"p")
    cache = tmp_path / "cache"
    (cache / "chunks").mkdir(parents=True)
    monkeypatch.chdir(here)
    cases = [
        ("/", "refusing to empty /"),
        (str(tmp_path / "work"), "holds the current directory"),
        (".", "holds the current directory"),
        (str(cache), "overlaps the cache directory"),
        (str(cache / "chunks"), "overlaps the cache directory"),
        (str(tmp_path), "holds the current directory"),
    ]
    for dest, phrase in cases:
        assert main(["cp", basic, ".", dest, "--clean-dest", "--cache-dir", str(cache)]) == 2, dest
        err = capsys.readouterr().err
        assert phrase in err, (dest, err)
        assert err.count("\n") == 1
    assert (here / "precious").read_bytes() == b"p"
    assert (cache / "chunks").is_dir()


def test_a_symlinked_subdirectory_of_dest_is_an_error_never_followed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    os.symlink(outside, dest / "a")
    for extra in ([], ["--overwrite"]):
        assert main(["cp", str(FIXTURES / "basic"), ".", str(dest), *extra]) == 1
        err = capsys.readouterr().err
        assert "a symbolic link in the way" in err
        assert "/out/a'" in err
        assert err.count("\n") == 1
        assert list(outside.iterdir()) == []
    # deeper: a link inside a real directory
    (dest / "a").unlink()
    (dest / "a").mkdir()
    os.symlink(outside, dest / "a" / "b")
    assert main(["cp", str(FIXTURES / "basic"), "a/b/y.txt", str(dest)]) in (1, 3)
    assert list(outside.iterdir()) == []
    (dest / "a" / "b").unlink()
    (dest / "a" / "b").write_bytes(b"a file where a directory goes")
    assert main(["cp", str(FIXTURES / "basic"), ".", str(dest)]) == 1
    assert "not a directory in the way" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hostile(tmp_path_factory.mktemp("hostile") / "arc")


def test_hostile_archive_paths_are_refused_before_anything_is_written(
    hostile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arc = hostile
    dest = tmp_path / "out"
    assert main(["cp", str(arc), ".", str(dest)]) == 4
    err = capsys.readouterr().err
    assert err.startswith("blobmount: entry ")
    assert err.count("\n") == 1
    assert not dest.exists()
    assert not (tmp_path / "escape").exists()
    assert not (arc.parent / "escape").exists()
    # a healthy subtree of the same archive copies
    assert main(["cp", str(arc), "ok", str(dest)]) == 0
    assert sorted(_files_under(dest)) == [b"big.bin", b"one.txt", b"two.txt"]
    for path, phrase in [
        ("past-blob.bin", "runs past the"),
        ("conf", "both a file and a directory"),
        ("conf/inner", "both a file and a directory"),
    ]:
        assert main(["cp", str(arc), path, str(tmp_path / "bad")]) == 4, path
        assert phrase in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("path", "phrase"),
    [
        ("bomb-small.txt", "corrupt zstd frame"),  # decoded in one call, its output bounded
        ("bomb-big.txt", "decodes past"),  # streamed
        ("truncated.txt", "corrupt zstd frame"),
        ("bad-checksum.txt", "corrupt zstd frame"),
        ("short-frame.txt", "original_size is"),
        ("wrong-hash.bin", "sha256 mismatch"),
        ("wrong-hash.txt", "sha256 mismatch"),
    ],
)
def test_bad_bytes_are_exit_5_and_leave_no_file(
    path: str, phrase: str, hostile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arc = hostile
    dest = tmp_path / "out"
    assert main(["cp", str(arc), path, "ok/one.txt", str(dest)]) == 5
    err = capsys.readouterr().err
    assert f"'{path}'" in err, err
    assert phrase in err, err
    assert err.count("\n") == 1
    assert not (dest / path).exists()
    assert (dest / "ok" / "one.txt").is_file()  # the good file beside it is done
    _no_temporaries(dest)


def test_a_tampered_raw_file_of_a_fixture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arc = tmp_path / "arc"
    shutil.copytree(FIXTURES / "basic", arc)
    view = IndexView((arc / "index.blob").read_bytes())
    entry = view.entry(view.resolve(b"small.txt"))
    data = bytearray((arc / "data.blob").read_bytes())
    data[entry.data_offset + 3] ^= 0x20
    (arc / "data.blob").chmod(0o644)
    (arc / "data.blob").write_bytes(data)
    dest = tmp_path / "out"
    assert main(["cp", str(arc), ".", str(dest)]) == 5
    err = capsys.readouterr().err
    assert "'small.txt'" in err
    assert entry.hash.hex() in err
    assert not (dest / "small.txt").exists()
    assert (dest / "top.md").exists()
    _no_temporaries(dest)


@pytest.mark.parametrize("args", [[], ["--buffer", "256K", "--concurrency", "3"], ["--concurrency", "1"]])
def test_large_files_stream_in_pieces(args: list[str], tmp_path: Path) -> None:
    rnd = os.urandom(3 * MiB + 12345)
    text = b"".join(b"line %d of a long text file\n" % i for i in range(200_000))  # ~5.6 MiB
    arc = tmp_path / "arc"
    write_archive(
        arc,
        [
            Spec(b"a.txt", b"small a"),
            Spec(b"big/raw.bin", rnd),
            Spec(b"big/text.txt", text, zstd=True),
            Spec(b"z.txt", b"small z" * 1000, zstd=True),
        ],
    )
    dest = tmp_path / "out"
    assert main(["cp", str(arc), ".", str(dest), *args]) == 0
    assert _files_under(dest) == {
        b"a.txt": b"small a",
        b"big/raw.bin": rnd,
        b"big/text.txt": text,
        b"z.txt": b"small z" * 1000,
    }


def test_a_small_zstd_file_larger_than_a_piece_is_streamed(tmp_path: Path) -> None:
    """Under the one-call decoding size (1 MiB) but stored in more than one piece (random bytes
    barely compress): its pieces go through the streaming decoder, not one call per piece."""
    rnd = os.urandom(200 << 10)
    arc = tmp_path / "arc"
    write_archive(arc, [Spec(b"a.txt", b"a"), Spec(b"r.bin", rnd, zstd=True), Spec(b"z.txt", b"z")])
    dest = tmp_path / "out"
    assert main(["cp", str(arc), ".", str(dest), "--buffer", "256K", "--concurrency", "4"]) == 0
    assert _files_under(dest) == {b"a.txt": b"a", b"r.bin": rnd, b"z.txt": b"z"}


def test_a_large_zstd_bomb_is_stopped_at_its_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Streamed through the decoder (over the one-call size): the output stops at original_size."""
    arc = tmp_path / "arc"
    data = bytes(2 * MiB)
    write_archive(arc, [Spec(b"bomb.bin", data, zstd=True, stored=bomb_frame(512 * MiB))])
    dest = tmp_path / "out"
    assert main(["cp", str(arc), ".", str(dest), "--buffer", "1M"]) == 5
    assert "decodes past" in capsys.readouterr().err
    assert not (dest / "bomb.bin").exists()
    _no_temporaries(dest)


def test_pieces_batch_small_files_and_cut_large_ones() -> None:
    opts = CopyOptions(concurrency=4, buffer_bytes=1 * MiB)
    size = piece_bytes(opts, None)
    assert size == 256 << 10
    assert piece_bytes(opts, 1 * MiB) == 1 * MiB  # whole chunks
    arc_entries = []
    offset = 0
    for i, n in enumerate([10, 20, 30, 700_000, 40, 0, 50]):
        arc_entries.append((b"f%d" % i, offset, n))
        offset += n
    view_free = [File(Item(_entry(number, path, off, n), path)) for number, (path, off, n) in enumerate(arc_entries)]
    pieces = list(cut_pieces(view_free, size))
    assert all(p.size <= size for p in pieces)
    assert [len(p.parts) for p in pieces] == [3, 1, 1, 1, 3]  # 700,000 bytes in three pieces
    assert view_free[3].pieces == 3
    assert [p.parts[0][3] for p in pieces[1:4]] == [0, 1, 2]
    covered = sorted((p.start, p.end) for p in pieces)
    assert covered[0][0] == 0
    assert covered[-1][1] == offset


def test_pieces_ramp_from_the_first_size_on_chunk_boundaries() -> None:
    """With `first`, pieces double from it to the piece size; a large file's cuts stay on
    multiples of the first size (the chunk size), so no chunk is split but at a file boundary."""
    sizes = [300_000] * 20 + [5 * MiB] + [10] * 3
    files, offset = [], 0
    for number, n in enumerate(sizes):
        files.append(File(Item(_entry(number, b"f%02d" % number, offset, n), b"f%02d" % number)))
        offset += n
    pieces = list(cut_pieces(files, 4 * MiB, first=1 * MiB))
    assert pieces[0].size <= 1 * MiB < pieces[1].size <= 2 * MiB
    assert max(p.size for p in pieces) <= 4 * MiB
    assert sum(p.size for p in pieces) == offset
    big = files[20]
    assert big.pieces > 1
    cuts = [p.start for p in pieces if p.parts[0][0] is big][1:]
    assert cuts
    assert all(c % MiB == 0 for c in cuts)


def test_plan_tells_a_directorys_span_before_validating_and_never_for_a_missing_path(tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    write_archive(arc, [Spec(b"a/x", b"x" * 100), Spec(b"a/y", b"y" * 50), Spec(b"b/z", b"z" * 7)])
    view = IndexView((arc / "index.blob").read_bytes())
    spans: list[tuple[int, int]] = []
    items = plan(view, [b"a"], lambda lo, hi: spans.append((lo, hi)))
    assert spans == [view.data_span(b"a")]
    lo, hi = spans[0]
    assert all(lo <= i.entry.data_offset and i.entry.data_offset + i.entry.data_size <= hi for i in items)
    spans.clear()
    with pytest.raises(NotFound):
        plan(view, [b"nothing/here"], lambda lo, hi: spans.append((lo, hi)))
    assert plan(view, [b"b/z"], lambda lo, hi: spans.append((lo, hi)))[0].rel == b"b/z"
    assert spans == []  # files alone: nothing to start early


def _entry(number: int, path: bytes, offset: int, size: int) -> Entry:
    return Entry(number, path, offset, size, size, hashlib.sha256(b"").digest(), 0o644, 0, 0, 0, 0)


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    basic = str(FIXTURES / "basic")
    assert main(["cp", basic, ".", str(tmp_path / "o"), "--concurrency", "0"]) == 2
    assert main(["cp", basic, ".", str(tmp_path / "o"), "--buffer", "lots"]) == 2
    assert main(["cp", basic, str(tmp_path / "o")]) == 2  # no PATH
    assert not (tmp_path / "o").exists()


def test_compressed_small_files_are_verified_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arc = tmp_path / "arc"
    good = b"good text " * 300
    write_archive(
        arc,
        [Spec(b"a.txt", good, zstd=True), Spec(b"b.txt", b"x" * 5000, zstd=True, stored=compress(b"y" * 5000))],
    )
    dest = tmp_path / "out"
    assert main(["cp", str(arc), ".", str(dest)]) == 5
    assert "'b.txt'" in capsys.readouterr().err
    assert _files_under(dest) == {b"a.txt": good}


def test_memory_held_stays_under_the_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """However large the files, the fetched bytes not yet written stay within --buffer."""
    from blobmount.extract import pieces

    peak = 0
    acquire = pieces.Budget.acquire

    async def counting(self: pieces.Budget, n: int) -> None:
        nonlocal peak
        await acquire(self, n)
        peak = max(peak, self.used)

    monkeypatch.setattr(pieces.Budget, "acquire", counting)
    big = os.urandom(1 << 20) * 12
    arc = tmp_path / "arc"
    write_archive(arc, [Spec(b"big.bin", big), Spec(b"big.txt", b"text " * (2 << 20), zstd=True)])
    assert main(["cp", str(arc), ".", str(tmp_path / "out"), "--buffer", "1M", "--concurrency", "4"]) == 0
    assert 0 < peak <= 1 << 20
    assert (tmp_path / "out" / "big.bin").read_bytes() == big


def test_progress_and_fsync(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cp", str(FIXTURES / "mixed"), ".", str(tmp_path / "out"), "--progress", "--fsync"]) == 0
    err = capsys.readouterr().err
    assert "\rcp [" in err
    assert "300/300 files" in err
    assert len(_files_under(tmp_path / "out")) == 300
