"""The reference writer's options in `create` and `push`: --max-files, --change-detection,
the skip-compression rules, and parallel zstd (--threads) writing the same bytes as one thread.

Real creates of temporary trees through the command (`main`, and a subprocess where a second
process changes a file while it is read); the archives are read back through the index."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

import blobmount.create
from blobmount.cli import main
from blobmount.create import CreateOptions, create_archive, files, parallel, walk
from blobmount.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, LimitExceeded, SourceError
from blobmount.index import COMPRESSION_NONE, COMPRESSION_ZSTD, IndexView
from blobmount.sources.local import open_directory

WAIT_S = 60.0
TEXT = b"static int buffer_size(const struct path *p) { return p->len; }\n"


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def compressions(out: Path, layout_tag: str | None = None) -> dict[str, int]:
    opened = open_directory(out) if layout_tag is None else None
    if opened is None:
        from blobmount.registry.options import RegistryOptions
        from blobmount.sources import open_archive

        opened = open_archive(f"oci:{out}:{layout_tag}", RegistryOptions())
    view = IndexView(opened.index_bytes, blob_size=opened.data.size)
    opened.data.close()
    return {os.fsdecode(view.entry(i).path): view.entry(i).compression for i in range(len(view))}


def five(tmp: Path) -> Path:
    return tree(tmp / "src", {f"d/{i}.txt": TEXT * (i + 1) for i in range(5)})


# --max-files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "ok"), [("4", False), ("5", True), ("-1", True), ("0", True)])
def test_max_files(limit: str, ok: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = five(tmp_path)
    code = main(["create", str(src), str(tmp_path / "out"), "--max-files", limit])
    err = capsys.readouterr().err
    if ok:
        assert code == EXIT_OK, err
        assert len(compressions(tmp_path / "out")) == 5
    else:
        assert code == EXIT_ERROR
        assert err == f"blobmount: {src}: 5 files, more than --max-files 4\n"
        assert not (tmp_path / "out").exists()  # refused before anything is written


def test_max_files_zero_is_the_reference_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """0 means the reference's DefaultMaxFiles (200,000; made 3 here so that 5 files pass it)."""
    assert blobmount.create.options.REFERENCE_MAX_FILES == 200_000
    monkeypatch.setattr(blobmount.create.options, "REFERENCE_MAX_FILES", 3)
    with pytest.raises(LimitExceeded, match="5 files, more than --max-files 3"):
        create_archive(five(tmp_path), tmp_path / "out", CreateOptions(max_files=0))
    assert create_archive(tmp_path / "src", tmp_path / "out", CreateOptions(max_files=-1)).entries == 5
    assert create_archive(tmp_path / "src", tmp_path / "out").entries == 5  # the default: no limit


def test_max_files_from_the_environment_and_for_push(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = five(tmp_path)
    monkeypatch.setenv("BLOBMOUNT_MAX_FILES", "2")
    assert main(["create", str(src), str(tmp_path / "out")]) == EXIT_ERROR
    assert "5 files, more than --max-files 2" in capsys.readouterr().err
    assert main(["push", str(src), f"oci:{tmp_path / 'layout'}:v1"]) == EXIT_ERROR
    assert "5 files, more than --max-files 2" in capsys.readouterr().err
    assert main(["push", str(src), f"oci:{tmp_path / 'layout'}:v1", "--max-files", "5"]) == EXIT_OK


# skip-compression rules ---------------------------------------------------------------------

MIXED = {
    "small.txt": TEXT,  # 64 bytes: under the 1K minimum
    "big.txt": TEXT * 1000,
    "pic.png": TEXT * 1000,  # compressible, but the name says it is not
    "Data.RAW": TEXT * 1000,
}
Z, N = COMPRESSION_ZSTD, COMPRESSION_NONE


@pytest.mark.parametrize(
    ("flags", "env", "want"),
    [
        ([], {}, {"small.txt": N, "big.txt": Z, "pic.png": N, "Data.RAW": Z}),
        (["--no-skip-compression"], {}, {"small.txt": Z, "big.txt": Z, "pic.png": Z, "Data.RAW": Z}),
        (["--skip-compression-below", "64K"], {}, {"small.txt": N, "big.txt": N, "pic.png": N, "Data.RAW": N}),
        (["--skip-compression-below", "0"], {}, {"small.txt": Z, "big.txt": Z, "pic.png": N, "Data.RAW": Z}),
        (["--skip-compression-ext", "raw,.TXT"], {}, {"small.txt": N, "big.txt": N, "pic.png": Z, "Data.RAW": N}),
        (["--skip-compression-ext", "raw", "--skip-compression-ext", "txt"], {}, {"big.txt": N, "Data.RAW": N}),
        ([], {"BLOBMOUNT_SKIP_COMPRESSION_EXT": ""}, {"small.txt": N, "big.txt": Z, "pic.png": Z, "Data.RAW": Z}),
        ([], {"BLOBMOUNT_SKIP_COMPRESSION": "off"}, {"small.txt": Z, "pic.png": Z}),
        (["--compression", "none", "--no-skip-compression"], {}, dict.fromkeys(MIXED, N)),
    ],
)
def test_skip_compression_rules(
    flags: list[str], env: dict[str, str], want: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    src = tree(tmp_path / "src", MIXED)
    assert main(["create", str(src), str(tmp_path / "out"), *flags]) == EXIT_OK
    got = compressions(tmp_path / "out")
    assert {k: got[k] for k in want} == want


def test_push_takes_the_skip_rules(tmp_path: Path) -> None:
    src = tree(tmp_path / "src", MIXED)
    layout = tmp_path / "layout"
    assert main(["push", str(src), f"oci:{layout}:v1", "--no-skip-compression"]) == EXIT_OK
    assert set(compressions(layout, "v1").values()) == {Z}


def test_skip_rules_from_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text('skip_compression_ext = ["raw"]\nskip-compression-below = "2K"\n')
    src = tree(tmp_path / "src", {**MIXED, "mid.c": TEXT * 20})  # 1280 bytes: over 1K, under 2K
    assert main(["create", str(src), str(tmp_path / "out"), "--config", str(config)]) == EXIT_OK
    got = compressions(tmp_path / "out")
    assert (got["mid.c"], got["pic.png"], got["Data.RAW"], got["big.txt"]) == (N, Z, N, Z)
    assert main(["create", str(src), str(tmp_path / "o2"), "--skip-compression-below", "lots"]) == EXIT_USAGE
    assert capsys.readouterr().err.count("\n") == 1


# --threads: parallel zstd, the same bytes ----------------------------------------------------


def mixed_tree(root: Path) -> Path:
    """Large and small, compressible and not, raw by name and by size: the parallel writer's cases."""
    rng = random.Random(20)
    files: dict[str, bytes] = {}
    for i in range(40):
        size = rng.choice([10, 900, 5000, 300_000, 1 << 20, 3 << 20])
        kind = rng.choice(["text", "random"])
        data = (TEXT * (size // len(TEXT) + 1))[:size] if kind == "text" else rng.randbytes(size)
        files[f"{rng.choice(['a', 'b', 'c/d'])}/{i:02d}{rng.choice(['.c', '.png', '', '.bin'])}"] = data
    return tree(root, files)


def test_threads_write_the_same_bytes_as_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = mixed_tree(tmp_path / "src")
    outs = {}
    for threads in ("1", "2", "4"):
        out = tmp_path / f"out-{threads}"
        assert main(["create", str(src), str(out), "--threads", threads]) == EXIT_OK
        outs[threads] = ((out / "index.blob").read_bytes(), (out / "data.blob").read_bytes())
    # and with a memory budget so small that every file waiting for its turn is spilled to disk
    monkeypatch.setattr(parallel, "PARALLEL_BUFFER_BYTES", 0)
    out = tmp_path / "out-spilled"
    assert main(["create", str(src), str(out), "--threads", "2"]) == EXIT_OK
    outs["spilled"] = ((out / "index.blob").read_bytes(), (out / "data.blob").read_bytes())
    assert len(set(outs.values())) == 1
    view = IndexView(outs["1"][0], blob_size=len(outs["1"][1]))
    assert view.data_hash == hashlib.sha256(outs["1"][1]).digest()
    assert {view.entry(i).compression for i in range(len(view))} == {Z, N}


def test_threads_must_not_be_negative(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["create", str(five(tmp_path)), str(tmp_path / "out"), "--threads", "-1"]) == EXIT_USAGE
    assert capsys.readouterr().err == "blobmount: --threads -1: 0 (one per core) or more\n"


# --change-detection ----------------------------------------------------------------------------


@pytest.fixture
def change_after_first_block(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Files named in the yielded list are changed in place (same size, new mtime) right after
    their first block is read: the deterministic form of a file that changes while archived."""
    targets: list[Path] = []
    original = files.Ring.blocks

    def blocks(self: files.Ring, f: BinaryIO, rel: bytes) -> Iterator[memoryview]:
        for i, block in enumerate(original(self, f, rel)):
            yield block
            hit = [t for t in targets if os.fsencode(t).endswith(b"/" + rel)]
            if i == 0 and hit:
                with open(hit[0], "r+b") as w:
                    w.write(b"#")
                st = os.stat(hit[0])
                os.utime(hit[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    monkeypatch.setattr(files.Ring, "blocks", blocks)
    return targets


@pytest.mark.parametrize(
    ("compression", "threads", "budget"), [("none", 1, None), ("zstd", 1, None), ("zstd", 2, None), ("zstd", 2, 0)]
)
def test_strict_change_detection_names_the_changed_file(
    compression: str,
    threads: int,
    budget: int | None,
    tmp_path: Path,
    change_after_first_block: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Also with every file behind the failing one spilled to a spool file (budget 0): the workers
    stop, and neither the temporary data blob nor a spool file is left."""
    if budget is not None:
        monkeypatch.setattr(parallel, "PARALLEL_BUFFER_BYTES", budget)
    rng = random.Random(7)
    files = {f"f{i:02d}.bin": rng.randbytes(3 << 20) for i in range(8)}
    src = tree(tmp_path / "src", files)
    change_after_first_block.append(src / "f02.bin")
    strict = CreateOptions(compression=compression, change_detection="strict", threads=threads)
    changed = r"^'f02\.bin': changed while archiving \(mtime moved; --change-detection strict\)$"
    with pytest.raises(SourceError, match=changed):
        create_archive(src, tmp_path / "out", strict)
    assert not (tmp_path / "out" / "data.blob").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no temporary or spool file left
    # the default does not look (one fstat per file, no second): it archives what it read
    result = create_archive(src, tmp_path / "out", CreateOptions(compression=compression, threads=threads))
    assert result.entries == 8


def test_strict_change_detection_sees_a_file_replaced_after_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = five(tmp_path)
    walk_tree = walk.walk_tree

    def walk_then_replace(root: bytes) -> tuple[list[walk.Source], int]:
        found = walk_tree(root)
        (src / "d" / "new").write_bytes(TEXT * 3)
        os.replace(src / "d" / "new", src / "d" / "2.txt")
        return found

    monkeypatch.setattr(blobmount.create, "walk_tree", walk_then_replace)
    with pytest.raises(SourceError, match=r"^'d/2\.txt': replaced by another file while archiving"):
        create_archive(src, tmp_path / "out", CreateOptions(change_detection="strict"))


def test_strict_change_detection_with_another_process_writing(tmp_path: Path) -> None:
    """A real second process rewrites bytes of a large file in place (same size) and moves its
    mtime, for at most 30 s, while `blobmount create` runs: strict fails naming the file, exit 1;
    the default, which only compares the size, archives it."""
    big = tmp_path / "src" / "big.bin"
    big.parent.mkdir()
    with open(big, "wb") as f:
        for _ in range(16):
            f.write(random.Random(3).randbytes(8 << 20))
    (tmp_path / "src" / "small.txt").write_bytes(TEXT)
    writer_code = (
        "import os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY)\n"
        "size = os.fstat(fd).st_size\n"
        "end = time.monotonic() + 30\n"
        "i = 0\n"
        "while time.monotonic() < end:\n"
        "    os.pwrite(fd, b'x', (i * 7919) % size)\n"
        "    os.utime(sys.argv[1], ns=(1, 10**18 + i))\n"
        "    if i == 0:\n"
        "        print('ready', flush=True)\n"
        "    i += 1\n"
        "    time.sleep(0.0005)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", writer_code, str(big)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "ready\n"
        started = time.monotonic()
        cmd = [sys.executable, "-m", "blobmount.cli", "create", str(tmp_path / "src")]
        strict = subprocess.run(
            [*cmd, str(tmp_path / "strict"), "--change-detection", "strict"],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        default = subprocess.run([*cmd, str(tmp_path / "default")], capture_output=True, text=True, timeout=WAIT_S)
        assert writer.poll() is None, "the writer stopped before both creates were done"
        assert time.monotonic() - started < 30
    finally:
        writer.kill()
        writer.wait(WAIT_S)
        if writer.stdout is not None:
            writer.stdout.close()
    assert strict.returncode == EXIT_ERROR, strict.stderr
    assert strict.stderr.startswith("blobmount: 'big.bin': changed while archiving (mtime moved"), strict.stderr
    assert strict.stderr.count("\n") == 1
    assert default.returncode == EXIT_OK, default.stderr
