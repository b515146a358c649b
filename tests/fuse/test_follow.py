"""--follow against a real docker-registry: a tag pushed again is switched to in one step.

v1 holds a file that changes, one that stays, one that goes; v2 changes the first, keeps the
second, drops the third and adds one. The mount follows the tag every second: the switch shows in
the root's user.blobmount.digest xattr, `blobmount status` and the info metric; a listing after it
has the new names and not the old one; a file held open across it reads v1 to its end; the bytes
the switch fetched (counted at a proxy in front of the registry) are the changed file and the
index, not the unchanged file again. A v2 whose index is not an index is refused with one log line
while v1 serves; SIGHUP checks at once."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import trio

from blobmount.manifest import archive_manifest
from blobmount.reference import Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from blobmount.sources.oci_layout import write_oci_layout
from tests.support.faults import Fault, FaultProxy, Kind
from tests.support.follow import SWITCH_WAIT_S, archive_of, served_digest
from tests.support.helpers import FIXTURES
from tests.support.mounts import blobmount_cmd, is_mounted, mounted
from tests.support.servers import QuirkProxy, Registry, free_port

pytestmark = pytest.mark.fuse

MiB = 1 << 20
BIG = 8 * MiB


def _push(host: str, repo_tag: str, archive_dir: Path) -> str:
    ref = Reference.parse(f"{host}/{repo_tag}")
    return str(trio.run(functools.partial(push_archive, archive_dir, ref, RegistryOptions())))


def _wait_served(mnt: Path, digest: str, log: Path) -> float:
    started = time.monotonic()
    while served_digest(mnt) != digest:
        if time.monotonic() - started > SWITCH_WAIT_S:
            pytest.fail(f"no switch to {digest} within {SWITCH_WAIT_S} s:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    return time.monotonic() - started


def _status(mnt: Path) -> dict[str, object]:
    out = subprocess.run(
        blobmount_cmd("status", "--json", str(mnt)), capture_output=True, text=True, timeout=60, check=True
    )
    st: dict[str, object] = json.loads(out.stdout)
    return st


V1 = {"big.bin": os.urandom(BIG), "same.bin": os.urandom(BIG), "gone.txt": b"gone\n", "sub/keep.txt": b"keep\n"}
V2 = {"big.bin": os.urandom(BIG), "same.bin": V1["same.bin"], "new.txt": b"new\n", "sub/keep.txt": b"keep\n"}


def test_follow_switches_atomically_and_fetches_only_what_changed(
    registry: Registry, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    v1, v2 = archive_of(tmp_path, "v1", V1), archive_of(tmp_path, "v2", V2)
    d1 = _push(registry.host, "follow/main:cur", v1)
    ref = f"127.0.0.1:{quirk_proxy.port}/follow/main:cur"
    port = free_port()
    with mounted(
        ref, tmp_path / "mnt", "--follow", "--follow-interval", "1", "-v", "--metrics", f"127.0.0.1:{port}"
    ) as m:
        root = m.path
        assert served_digest(root) == d1
        assert sorted(os.listdir(root)) == ["big.bin", "gone.txt", "same.bin", "sub"]
        for rel, data in V1.items():  # everything of v1 in the cache
            assert (root / rel).read_bytes() == data, rel
        same_ino = os.stat(root / "same.bin").st_ino
        held = open(root / "big.bin", "rb", buffering=0)  # closed below
        try:
            os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # its later reads reach the daemon
            first = held.read(64 << 10)
            mark = quirk_proxy.state.body_bytes_sent

            d2 = _push(registry.host, "follow/main:cur", v2)
            _wait_served(root, d2, m.log_path)

            rest = b"".join(iter(lambda: held.read(1 << 20), b""))
            assert first + rest == V1["big.bin"]  # the open file read v1 to its end
            assert os.fstat(held.fileno()).st_size == BIG
        finally:
            held.close()
        assert sorted(os.listdir(root)) == ["big.bin", "new.txt", "same.bin", "sub"]  # added, removed
        assert not (root / "gone.txt").exists()
        for rel, data in V2.items():
            assert (root / rel).read_bytes() == data, rel
        assert os.stat(root / "same.bin").st_ino != same_ino  # every file of v2 has a new number
        fetched = quirk_proxy.state.body_bytes_sent - mark
        index = (v2 / "index.blob").stat().st_size
        # the changed file (whole 1 MiB chunks of the new data blob) and the index; same.bin not again
        assert fetched <= BIG + index + 2 * MiB, fetched
        assert fetched < BIG + BIG // 2, fetched

        st = _status(root)
        assert str(st["pinned"]).endswith("@" + d2)
        follow = st["follow"]
        assert isinstance(follow, dict)
        assert follow["switches"] == 1
        assert follow["refused"] is None
        v2_index = "sha256:" + hashlib.sha256((v2 / "index.blob").read_bytes()).hexdigest()
        assert st["index_digest"] == v2_index
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            text = response.read().decode()
        info = [line for line in text.splitlines() if line.startswith("blobmount_info{")]
        assert len(info) == 1, info
        assert v2_index in info[0], info
        assert 'blobmount_follow_checks_total{result="switched"} 1' in text
        log = m.log()
    switched = [line for line in log.splitlines() if "switched from" in line]
    assert len(switched) == 1, log
    assert d2 in switched[0]
    assert "1 added, 1 removed, 1 changed" in switched[0]
    assert "Traceback" not in log


def test_a_corrupt_new_archive_is_refused_while_the_old_one_serves(registry: Registry, tmp_path: Path) -> None:
    small = {"a.txt": b"one\n", "b.txt": b"two\n"}
    v1 = archive_of(tmp_path, "v1", small)
    d1 = _push(registry.host, "follow/bad:cur", v1)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(v1 / "data.blob", bad / "data.blob")
    (bad / "index.blob").write_bytes(b"this is not a flatbuffers index" * 8)
    with mounted(f"{registry.host}/follow/bad:cur", tmp_path / "mnt", "--follow", "--follow-interval", "1") as m:
        d_bad = _push(registry.host, "follow/bad:cur", bad)
        started = time.monotonic()
        while "refused" not in m.log():
            assert time.monotonic() - started < SWITCH_WAIT_S, m.log()
            time.sleep(0.2)
        time.sleep(3)  # three more checks: the same bad digest is not reported again
        assert served_digest(m.path) == d1
        assert (m.path / "a.txt").read_bytes() == b"one\n"
        assert sorted(os.listdir(m.path)) == ["a.txt", "b.txt"]
        refused = [line for line in m.log().splitlines() if "refused" in line]
        assert len(refused) == 1, refused
        assert d_bad in refused[0]
        st = _status(m.path)
        assert isinstance(st["follow"], dict)
        assert st["follow"]["refused"] == d_bad
        v2 = archive_of(tmp_path, "v2", {"a.txt": b"one again\n"})  # a good one after it is taken
        d2 = _push(registry.host, "follow/bad:cur", v2)
        _wait_served(m.path, d2, m.log_path)
        assert sorted(os.listdir(m.path)) == ["a.txt"]
        assert (m.path / "a.txt").read_bytes() == b"one again\n"
        assert "Traceback" not in m.log()


def test_sighup_checks_at_once_under_follow(registry: Registry, tmp_path: Path) -> None:
    v1 = archive_of(tmp_path, "v1", {"f.txt": b"v1\n"})
    v2 = archive_of(tmp_path, "v2", {"f.txt": b"v2\n"})
    d1 = _push(registry.host, "follow/hup:cur", v1)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(SWITCH_WAIT_S)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    args = ("--follow", "--follow-interval", "3600")
    with sock, mounted(f"{registry.host}/follow/hup:cur", tmp_path / "mnt", *args, env=env) as m:
        d2 = _push(registry.host, "follow/hup:cur", v2)
        time.sleep(2)
        assert served_digest(m.path) == d1  # the interval is an hour: nothing checked yet
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while sock.recv(4096):  # what was said before the switch
                pass
        sock.settimeout(SWITCH_WAIT_S)
        m.proc.send_signal(signal.SIGHUP)
        _wait_served(m.path, d2, m.log_path)
        assert (m.path / "f.txt").read_bytes() == b"v2\n"
        assert m.proc.poll() is None  # still mounted: SIGHUP did not stop it
        status = sock.recv(4096).decode()
        assert status.startswith("STATUS=serving ")
        assert d2 in status  # systemd's status line names the new digest


def test_sighup_without_follow_still_unmounts(tmp_path: Path) -> None:
    with mounted(str(FIXTURES / "basic"), tmp_path / "mnt") as m:
        m.proc.send_signal(signal.SIGHUP)
        assert m.proc.wait(60) == 0
        assert not is_mounted(m.path)


def test_an_oci_layout_is_followed_through_its_index_json(tmp_path: Path) -> None:
    v1 = archive_of(tmp_path, "v1", {"f.txt": b"v1\n", "g.txt": b"g\n"})
    v2 = archive_of(tmp_path, "v2", {"f.txt": b"v2 longer\n"})
    layout = tmp_path / "layout"
    write_oci_layout(v1, f"{layout}:t", archive_manifest(v1, {}))
    with mounted(f"oci:{layout}:t", tmp_path / "mnt", "--follow", "--follow-interval", "1") as m:
        before = served_digest(m.path)
        assert (m.path / "f.txt").read_bytes() == b"v1\n"
        write_oci_layout(v2, f"{layout}:t", archive_manifest(v2, {}))
        started = time.monotonic()
        while served_digest(m.path) == before:
            assert time.monotonic() - started < SWITCH_WAIT_S, m.log()
            time.sleep(0.1)
        assert sorted(os.listdir(m.path)) == ["f.txt"]
        assert (m.path / "f.txt").read_bytes() == b"v2 longer\n"


@pytest.mark.parametrize(
    ("source", "extra", "env"),
    [
        ("127.0.0.1:1/r@sha256:" + "0" * 64, ("--follow",), {}),
        ("127.0.0.1:1/r:tag", ("--follow", "--offline"), {}),
        ("127.0.0.1:1/r:tag", ("-o", "follow,offline"), {}),
        ("127.0.0.1:1/r:tag", ("--offline",), {"BLOBMOUNT_FOLLOW": "1"}),
        ("/nonexistent/dir", ("--follow",), {}),
    ],
)
def test_follow_of_what_cannot_move_is_a_usage_error(
    source: str, extra: tuple[str, ...], env: dict[str, str], tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = subprocess.run(
        blobmount_cmd("mount", "-f", source, str(mnt), *extra),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert "--follow" in out.stderr


def test_a_registry_failing_while_the_new_archive_is_fetched_is_retried_not_refused(
    registry: Registry, tmp_path: Path
) -> None:
    v1 = archive_of(tmp_path, "v1", {"f.txt": b"v1\n"})
    v2 = archive_of(tmp_path, "v2", {"f.txt": b"v2\n"})
    d1 = _push(registry.host, "follow/flaky:cur", v1)
    index_path = "/blobs/sha256:" + hashlib.sha256((v2 / "index.blob").read_bytes()).hexdigest()
    proxy = FaultProxy(registry.host)
    try:
        ref = f"127.0.0.1:{proxy.port}/follow/flaky:cur"
        with mounted(ref, tmp_path / "mnt", "--follow", "--follow-interval", "1", "--timeout", "2") as m:
            fault = proxy.add(Fault(Kind.STATUS, match=lambda r: r.path.endswith(index_path), status=503))
            d2 = _push(registry.host, "follow/flaky:cur", v2)
            started = time.monotonic()
            while "--follow: opening" not in m.log():  # a check gave up on the new index
                assert time.monotonic() - started < SWITCH_WAIT_S, m.log()
                time.sleep(0.2)
            assert fault.hits >= 1
            assert served_digest(m.path) == d1
            st = _status(m.path)
            assert isinstance(st["follow"], dict)
            assert st["follow"]["refused"] is None
            proxy.clear()
            _wait_served(m.path, d2, m.log_path)
            assert (m.path / "f.txt").read_bytes() == b"v2\n"
            assert "refused" not in m.log()
    finally:
        proxy.stop()
