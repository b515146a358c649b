"""`blobmount push` against the real registry: monolithic and chunked uploads, blobs the registry
already has, progress on a terminal, and pushes that break midway never moving the tag."""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import pty
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from blobmount.cli import main
from blobmount.create import CreateOptions, create_archive
from blobmount.manifest import MANIFEST_MEDIA_TYPE
from blobmount.reference import Digest, Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support.helpers import FIXTURES, extract_tree, tree_files
from tests.support.servers import QuirkProxy, Registry

CREATED = "2024-01-02T03:04:05Z"
WAIT_S = 60.0  # hang guard for subprocesses and held uploads


def make_archive(tmp: Path, name: str, size: int, seed: int) -> Path:
    """An uncompressed archive holding one random file of `size` bytes (+ a small one)."""
    src = tmp / f"{name}-src"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(seed).randbytes(size))
    (src / "note.txt").write_text(f"{name}\n")
    out = tmp / name
    create_archive(str(src), str(out), CreateOptions("none", 3))
    return out


def tag_digest(reg: Registry, repo: str, tag: str) -> str | None:
    """What the registry itself says the tag points at (HEAD, straight to the registry)."""
    conn = http.client.HTTPConnection(reg.host, timeout=30)
    try:
        conn.request("HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_MEDIA_TYPE})
        resp = conn.getresponse()
        resp.read()
        return resp.getheader("Docker-Content-Digest") if resp.status == 200 else None
    finally:
        conn.close()


def blob_present(reg: Registry, repo: str, digest: Digest) -> bool:
    conn = http.client.HTTPConnection(reg.host, timeout=30)
    try:
        conn.request("HEAD", f"/v2/{repo}/blobs/{digest}")
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    finally:
        conn.close()


def push(archive: Path, ref: str, **kw: Any) -> Digest:
    call = functools.partial(push_archive, archive, Reference.parse(ref), RegistryOptions(), created=CREATED, **kw)
    return trio.run(call)


def uploads(proxy: QuirkProxy) -> list[tuple[str, str, dict[str, str]]]:
    return [(m, p, h) for m, p, h in proxy.state.seen if "/blobs/uploads/" in p]


def test_large_blobs_go_up_in_a_patch_sequence(
    registry: Registry, quirk_proxy: QuirkProxy, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    archive = make_archive(tmp_path, "arc", 3 << 20, seed=1)
    data_size = (archive / "data.blob").stat().st_size
    chunk = 256 << 10
    digest = push(archive, f"{quirk_proxy.host}/push/chunked:v1", chunked_above=1 << 20, chunk_bytes=chunk)
    patches = [h["content-range"] for m, _, h in uploads(quirk_proxy) if m == "PATCH"]
    starts = list(range(0, data_size, chunk))
    assert patches == [f"{a}-{min(a + chunk, data_size) - 1}" for a in starts]
    puts = [(p, h) for m, p, h in uploads(quirk_proxy) if m == "PUT"]
    assert [h["content-length"] != "0" for _, h in puts] == [True, True, False]  # config, index; data closes

    # the same archive pushed monolithically yields the same manifest
    assert push(archive, f"{registry.host}/push/monolithic:v1") == digest
    assert main(["cat", f"{registry.host}/push/chunked:v1", "big.bin"]) == 0
    assert capsysbinary.readouterr().out == random.Random(1).randbytes(3 << 20)


@pytest.mark.expect_log(r"^blobmount\.registry\.upload: .* broke \(")
def test_a_lost_chunk_answer_starts_the_upload_over(
    registry: Registry, quirk_proxy: QuirkProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The registry took the third chunk but its answer was lost: the retried PATCH no longer fits
    the session, so the upload starts over in a new one and the push still succeeds."""
    archive = make_archive(tmp_path, "arc", 2 << 20, seed=2)
    quirk_proxy.state.lose_patch_answer = 3
    digest = push(archive, f"{quirk_proxy.host}/push/lost:v1", chunked_above=1 << 20, chunk_bytes=256 << 10)
    assert "starting it over" in caplog.text
    caplog.clear()  # the warning was expected
    assert tag_digest(registry, "push/lost", "v1") == str(digest)
    posts = [p for m, p, _ in uploads(quirk_proxy) if m == "POST"]
    assert len(posts) == 4  # config, index, data, data again
    data_digest = Digest.of((archive / "data.blob").read_bytes())
    assert blob_present(registry, "push/lost", data_digest)


def test_blobs_the_registry_has_are_not_uploaded_again(quirk_proxy: QuirkProxy, tmp_path: Path) -> None:
    archive = make_archive(tmp_path, "arc", 1 << 20, seed=3)
    first = push(archive, f"{quirk_proxy.host}/push/again:v1")
    assert len([1 for m, _, _ in uploads(quirk_proxy) if m == "POST"]) == 3  # config, index, data
    quirk_proxy.state.seen.clear()
    assert push(archive, f"{quirk_proxy.host}/push/again:v2") == first
    assert uploads(quirk_proxy) == []
    assert [m for m, p, _ in quirk_proxy.state.seen if "/blobs/" in p] == ["HEAD", "HEAD", "HEAD"]
    assert [m for m, p, _ in quirk_proxy.state.seen if "/manifests/" in p] == ["PUT"]


def _run_on_a_terminal(cmd: list[str]) -> tuple[int, bytes]:
    """Run `cmd` with stderr on a pseudo-terminal; return its exit status and what it drew there."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        out = b""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    block = os.read(master, 65536)
                except OSError:  # EIO: the child closed its side
                    break
                if not block:
                    break
                out += block
            elif proc.poll() is not None:
                break
        return proc.wait(WAIT_S), out
    finally:
        os.close(master)


def test_progress_is_drawn_on_a_terminal_only(registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(4).randbytes(20 << 20))
    cmd = [sys.executable, "-m", "blobmount.cli", "push", str(src), f"{registry.host}/push/progress:v1"]
    status, drawn = _run_on_a_terminal([*cmd, "--compression", "none"])
    assert status == 0, drawn
    assert b"\rpush data [" in drawn
    assert b"100% 20 MiB" in drawn
    assert drawn.endswith(b"\r\n")  # the line is finished, not left for the shell prompt to overwrite
    piped = subprocess.run([*cmd, "--compression", "none"], capture_output=True, timeout=WAIT_S, check=True)
    assert b"push data" not in piped.stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_push_killed_during_the_data_upload_leaves_the_tag(
    sig: signal.Signals, registry: Registry, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    repo = f"push/killed-{sig.name.lower()}"
    old = make_archive(tmp_path, "old", 1 << 20, seed=5)
    new = make_archive(tmp_path, "new", 4 << 20, seed=6)
    before = str(push(old, f"{registry.host}/{repo}:v1"))
    quirk_proxy.state.hold_uploads_over = 2 << 20  # only the new data blob is that large
    cmd = [sys.executable, "-m", "blobmount.cli", "push", "--archive", str(new), f"{quirk_proxy.host}/{repo}:v1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert quirk_proxy.state.upload_held.wait(WAIT_S), "the data upload never started"
        proc.send_signal(sig)
        proc.wait(WAIT_S)
    finally:
        quirk_proxy.state.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    assert tag_digest(registry, repo, "v1") == before
    assert not blob_present(registry, repo, Digest.of((new / "data.blob").read_bytes()))
    # nothing is left half-done for the next push
    quirk_proxy.state.hold_uploads_over = None
    after = push(new, f"{quirk_proxy.host}/{repo}:v1")
    assert tag_digest(registry, repo, "v1") == str(after) != before


def test_a_refused_manifest_leaves_the_tag(
    registry: Registry, quirk_proxy: QuirkProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = make_archive(tmp_path, "old", 1 << 20, seed=7)
    new = make_archive(tmp_path, "new", 1 << 20, seed=8)
    before = str(push(old, f"{registry.host}/push/refused:v1"))
    quirk_proxy.state.fail_manifest_put = 400
    assert main(["push", "--archive", str(new), f"{quirk_proxy.host}/push/refused:v1"]) == 1
    err = capsys.readouterr().err
    assert "PUT manifest answered 400" in err
    assert err.count("\n") == 1
    assert tag_digest(registry, "push/refused", "v1") == before
    assert blob_present(registry, "push/refused", Digest.of((new / "data.blob").read_bytes()))  # blobs went up


def test_push_an_archive_directory_as_is(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    ref = f"{registry.host}/push/as-is:v1"
    assert main(["push", "--archive", str(FIXTURES / "mixed"), ref, "--created", CREATED]) == 0
    manifest = (FIXTURES / "mixed" / "oci-manifest.json").read_bytes()
    assert (
        capsys.readouterr().out.strip() == f"{registry.host}/push/as-is@sha256:{hashlib.sha256(manifest).hexdigest()}"
    )
    digest = Digest.of((FIXTURES / "mixed" / "data.blob").read_bytes())
    assert blob_present(registry, "push/as-is", digest)


def test_push_a_directory_into_an_oci_layout(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:

    src = extract_tree("mixed", tmp_path / "src")
    layout = tmp_path / "layout"
    assert main(["push", str(src), f"oci:{layout}:v1", "--created", CREATED]) == 0
    printed = capsysbinary.readouterr().out.decode().strip()
    assert printed.startswith(f"oci:{layout}:v1@sha256:")
    assert (layout / "blobs" / "sha256" / printed.rpartition(":")[2]).exists()
    files = tree_files("mixed")
    for path, f in list(files.items())[:20]:
        assert main(["cat", f"oci:{layout}:v1", os.fsdecode(path)]) == 0
        assert capsysbinary.readouterr().out == f.data


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_two_pushes_of_one_tree_with_source_date_epoch_give_one_digest(
    compression: str,
    registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The issue-13 tree (20 random files of 700 kB, half named .png so that zstd keeps them raw, and
    small ones): each push builds its archive afresh, and a data_hash that changed from run to run
    gave two digests."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(13)
    for i in range(20):
        (src / f"f{i:02d}.{'png' if i % 2 else 'bin'}").write_bytes(rng.randbytes(700_000))
        (src / f"n{i:02d}.txt").write_bytes(rng.randbytes(rng.randrange(1, 1024)))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    printed = []
    for tag in ("v1", "v2"):
        ref = f"{registry.host}/push/reproducible-{compression}:{tag}"
        assert main(["push", str(src), ref, "--compression", compression]) == 0
        printed.append(capsys.readouterr().out.strip())
    digests = {line.rpartition("@")[2] for line in printed}
    assert len(digests) == 1, printed
    repo = f"push/reproducible-{compression}"
    assert tag_digest(registry, repo, "v1") == tag_digest(registry, repo, "v2") == digests.pop()
    # the index names the data blob the registry holds
    assert main(["inspect", f"{registry.host}/{repo}:v1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert blob_present(registry, repo, Digest.parse(info["data_digest"]))
