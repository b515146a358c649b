"""The no-FUSE commands: create, ls, cat (verified, nothing of a bad file printed), sources."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from blobmount.cli import main
from blobmount.errors import SourceError
from blobmount.index import IndexView
from tests.support.helpers import FIXTURES, make_oci_layout, tree_files


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("blobmount ")


@pytest.mark.parametrize("form", ["dir:{}", "{}", "oci:{oci}", "oci:{oci}:v1"])
def test_ls_and_cat_every_source_form(form: str, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    oci = make_oci_layout(FIXTURES / "basic", tmp_path / "layout")
    source = form.format(str(FIXTURES / "basic"), oci=oci)
    assert main(["ls", source]) == 0
    names = capsysbinary.readouterr().out.split(b"\n")[:-1]
    assert b"top.md" in names
    assert b"a" in names
    assert main(["ls", source, "a", "-l"]) == 0
    out = capsysbinary.readouterr().out
    assert b"x.json" in out
    assert b"b/" in out
    files = tree_files("basic")
    for path in (b"a/x.json", b"small.txt", b"empty.txt", b"top.md"):
        assert main(["cat", source, os.fsdecode(path)]) == 0
        assert capsysbinary.readouterr().out == files[path].data


def test_errors_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    basic = str(FIXTURES / "basic")
    assert main(["ls", basic, "nope"]) == 3
    assert "nope" in capsys.readouterr().err
    assert main(["cat", basic, "a"]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert main(["ls", "team/Assets:v3"]) == 2  # parsed as a registry reference, refused offline
    assert "lowercase" in capsys.readouterr().err
    assert main(["ls", "./does-not-exist"]) == 1
    capsys.readouterr()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.blob").write_bytes(os.urandom(64))
    (bad / "data.blob").write_bytes(b"")
    assert main(["ls", str(bad)]) == 4
    err = capsys.readouterr().err
    assert err.startswith("blobmount: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("path", [b"a/x.json", b"small.txt"])
def test_cat_of_a_tampered_file_prints_nothing(
    path: bytes, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    arc = tmp_path / "arc"
    shutil.copytree(FIXTURES / "basic", arc)
    view = IndexView((arc / "index.blob").read_bytes())
    entry = view.entry(view.resolve(path))
    data = bytearray((arc / "data.blob").read_bytes())
    data[entry.data_offset + entry.data_size // 2] ^= 0x20
    (arc / "data.blob").chmod(0o644)
    (arc / "data.blob").write_bytes(data)
    assert main(["cat", str(arc), os.fsdecode(path)]) in (4, 5)
    captured = capsysbinary.readouterr()
    assert captured.out == b""
    err = captured.err.decode()
    assert err.count("\n") == 1
    if entry.compression == 0:
        assert entry.hash.hex() in err
        actual = hashlib.sha256(bytes(data[entry.data_offset : entry.data_offset + entry.data_size])).hexdigest()
        assert actual in err


@pytest.mark.expect_log(r"(symlink|special file) skipped \(only regular files")
def test_create_skips_symlinks_and_fifos_and_keeps_byte_names(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "real.txt").write_bytes(b"real\n" * 400)
    os.symlink("/etc/passwd", src / "link")
    os.mkfifo(src / "fifo")
    odd = os.path.join(os.fsencode(src), b"caf\xe9.txt")
    with open(odd, "wb") as f:
        f.write(b"latin-1 name\n")
    assert main(["create", str(src), str(tmp_path / "out")]) == 0
    assert "symlink skipped" in caplog.text
    assert "special file skipped" in caplog.text
    capsysbinary.readouterr()
    assert main(["ls", str(tmp_path / "out")]) == 0
    assert sorted(capsysbinary.readouterr().out.split(b"\n")[:-1]) == [b"caf\xe9.txt", b"real.txt"]
    assert main(["cat", str(tmp_path / "out"), os.fsdecode(b"caf\xe9.txt")]) == 0
    assert capsysbinary.readouterr().out == b"latin-1 name\n"


@pytest.mark.parametrize(
    "option", [["--level", "9"], ["--compression", "none"], ["--no-skip-compression"], ["--threads", "2"]]
)
def test_push_archive_refuses_the_options_that_build_one(
    tmp_path: Path, option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    layout = tmp_path / "layout"
    assert main(["push", "--archive", str(FIXTURES / "basic"), f"oci:{layout}:v1", *option]) == 2
    err = capsys.readouterr().err
    assert option[0].replace("--no-", "--") in err  # the option's name
    assert "pushes the archive as is" in err
    assert len(err.strip().splitlines()) == 1
    assert not layout.exists()  # refused before anything is written


def test_push_to_an_oci_layout_then_read_it(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    layout = tmp_path / "layout"
    src = FIXTURES / "basic"
    created = ["--created", "2024-01-02T03:04:05Z"]
    assert main(["push", "--archive", str(src), f"oci:{layout}:v1", *created]) == 0
    out = capsysbinary.readouterr().out.decode()
    manifest = (src / "oci-manifest.json").read_bytes()
    assert out.strip().endswith("@sha256:" + hashlib.sha256(manifest).hexdigest())  # the reference's bytes
    assert main(["push", "--archive", str(FIXTURES / "unicode"), f"oci:{layout}:v2", *created]) == 0
    capsysbinary.readouterr()
    for tag, name in (("v1", "basic"), ("v2", "unicode")):
        assert main(["ls", f"oci:{layout}:{tag}"]) == 0
        listed = capsysbinary.readouterr().out
        assert (b"top.md" in listed) == (name == "basic")
    assert main(["cat", f"oci:{layout}:v1", "top.md"]) == 0
    assert capsysbinary.readouterr().out == tree_files("basic")[b"top.md"].data


def test_ctrl_c_in_a_long_command_unwinds_in_order_then_is_keyboard_interrupt() -> None:
    """run_interruptible: SIGINT cancels the work at a checkpoint (its clean-up runs) and only then
    surfaces as KeyboardInterrupt (exit 130); the work's own errors come out as themselves."""
    import signal

    import trio

    from blobmount.cli.runner import run_interruptible
    from blobmount.errors import SourceError

    cleaned: list[str] = []

    async def work() -> None:
        signal.raise_signal(signal.SIGINT)
        try:
            await trio.sleep(30)  # hang guard: the signal ends it at once
        finally:
            cleaned.append("done")

    with pytest.raises(KeyboardInterrupt):
        run_interruptible(work)
    assert cleaned == ["done"]

    async def fails(message: str) -> None:
        await trio.lowlevel.checkpoint()
        raise SourceError(message)

    with pytest.raises(SourceError, match="registry said no"):
        run_interruptible(fails, "registry said no")

    async def answers() -> int:
        await trio.lowlevel.checkpoint()
        return 7

    assert run_interruptible(answers) == 7


def test_errors_inside_nursery_groups_reach_the_user_as_themselves() -> None:
    """trio wraps an error in a group per nursery it crosses (a command's, the chunk fetcher's):
    the CLI prints the error inside, with its exit code; a group holding something that is not
    ours stays whole, so a bug still shows in full."""
    from blobmount.cli.runner import unwrapped
    from blobmount.errors import IntegrityError, SourceError

    inner = IntegrityError("'a': sha256 mismatch")
    assert unwrapped(ExceptionGroup("outer", [ExceptionGroup("fetcher", [inner])])) is inner
    first, second = SourceError("one"), SourceError("two")
    assert unwrapped(ExceptionGroup("both", [first, ExceptionGroup("x", [second])])) is first
    mixed = ExceptionGroup("mixed", [SourceError("ours"), ValueError("a bug")])
    assert unwrapped(ExceptionGroup("outer", [mixed])) is mixed
    assert unwrapped(inner) is inner


def test_a_bad_flag_is_one_line_naming_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mount", "--verify", "bogus", "a", "b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--verify" in err
    assert "blobmount mount --help" in err


def test_a_bare_name_that_is_a_local_directory_is_refused_with_the_spelling_that_means_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tests/fixtures/x` is a Docker Hub reference by the SOURCE syntax; when a directory of that
    name exists the command fails before any request, in one line that says to write ./ before it
    (not an error from registry-1.docker.io). A name with a registry host, or one that is no local
    directory, is still a registry reference."""
    from blobmount.sources import remote

    asked: list[str] = []

    async def no_registry(spec: str, *args: object) -> None:
        asked.append(spec)
        raise SourceError("no registry in this test")

    monkeypatch.setattr(remote, "open_remote", no_registry)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURES / "basic", tmp_path / "tests" / "fixtures" / "x")
    shutil.copytree(FIXTURES / "basic", tmp_path / "localhost:5000" / "x")
    (tmp_path / "mnt").mkdir()
    for argv in (
        ["ls", "tests/fixtures/x"],
        ["cat", "tests/fixtures/x", "top.md"],
        ["prefetch", "tests/fixtures/x", "a", "--cache-dir", str(tmp_path / "cache")],
        ["mount", "tests/fixtures/x", "mnt", "--cache-dir", str(tmp_path / "cache")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("blobmount: "), err
        assert err.count("\n") == 1, err
        assert "a local directory of that name exists: write ./tests/fixtures/x" in err
        assert "docker.io" not in err
    assert asked == []
    assert main(["ls", "./tests/fixtures/x"]) == 0  # the hint's spelling works
    assert "top.md" in capsys.readouterr().out
    for ref in ("localhost:5000/x", "tests/fixtures/y"):  # a host named, or no such directory
        assert main(["ls", ref]) != 0
        assert "local directory" not in capsys.readouterr().err
    assert asked == ["localhost:5000/x", "tests/fixtures/y"]
