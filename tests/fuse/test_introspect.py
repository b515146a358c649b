"""A live daemon answers `blobmount status MNT` over its control socket (no --metrics needed) and,
with --metrics, serves /metrics, /healthz and /readyz; FUSE reads and registry traffic show up in
both. Real mounts, real HTTP over loopback, the real docker-registry for the remote case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import get, samples, status
from tests.support.helpers import FIXTURES, tree_files
from tests.support.mounts import mounted

pytestmark = pytest.mark.fuse
WAIT_S = 20.0


def test_status_and_metrics_of_a_local_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = tree_files("basic")
    env_runtime = tmp_path / "run"
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(env_runtime))  # the daemon and `status` both see it
    with mounted(f"dir:{FIXTURES / 'basic'}", tmp_path / "mnt", "--metrics", "127.0.0.1:0") as m:
        assert (m.path / "top.md").read_bytes() == files[b"top.md"].data
        with pytest.raises(FileNotFoundError):
            (m.path / "nope").stat()
        out = status(m.path, "--json")
        assert out.returncode == 0, out.stderr
        st = json.loads(out.stdout)
        assert st["ready"] is True
        assert st["source"] == f"dir:{FIXTURES / 'basic'}"
        assert st["index_digest"].startswith("sha256:")
        assert st["entries"] == len(files)
        assert st["served"]["read_bytes"] >= len(files[b"top.md"].data)
        assert st["socket"].startswith(str(env_runtime))
        assert oct(os.stat(st["socket"]).st_mode & 0o777) == "0o600"
        human = status(m.path)
        assert human.returncode == 0
        assert "hit rate" in human.stdout
        assert f"dir:{FIXTURES / 'basic'}" in human.stdout

        url = st["metrics_url"]
        code, body = get(url, "/metrics")
        assert code == 200
        values = samples(body.decode())
        assert values[("blobmount_ready", ())] == 1
        assert values[("blobmount_fuse_read_bytes_total", ())] >= len(files[b"top.md"].data)
        assert values[("blobmount_fuse_requests_total", (("op", "read"),))] >= 1
        assert values[("blobmount_fuse_errors_total", (("errno", "ENOENT"), ("op", "lookup")))] >= 1
        count = values[("blobmount_fuse_request_duration_seconds_count", (("op", "read"),))]
        assert count == values[("blobmount_fuse_requests_total", (("op", "read"),))]
        assert get(url, "/healthz") == (200, b"ok\n")
        assert get(url, "/readyz") == (200, b"ready\n")
        assert get(url, "/metrics", "HEAD") == (200, b"")
        assert get(url, "/nope")[0] == 404
        assert get(url, "/metrics", "POST")[0] == 405

        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(WAIT_S) == 0
        assert not Path(st["socket"]).exists()  # removed on the way out
    out = status(tmp_path / "mnt")
    assert out.returncode == 3  # no daemon: "not found"
    assert "no blobmount daemon" in out.stderr


def test_registry_traffic_is_counted(pushed: dict[str, str], tmp_path: Path) -> None:
    files = tree_files("uncompressed")
    with mounted(pushed["uncompressed"], tmp_path / "mnt") as m:
        total = sum(len((m.path / os.fsdecode(p)).read_bytes()) for p in files)
        st = json.loads(status(m.path, "--json").stdout)
    assert st["pinned"].startswith(pushed["uncompressed"].rsplit(":", 1)[0] + "@sha256:")
    assert st["fetched"]["http_requests"] >= 1
    assert st["fetched"]["http_bytes"] >= total  # everything read came over HTTP once
    assert st["served"]["read_bytes"] == total


def test_metrics_address_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "mnt").mkdir()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "blobmount.cli",
                f"dir:{FIXTURES / 'basic'}",
                str(tmp_path / "mnt"),
                "--metrics",
                f"127.0.0.1:{port}",
                "--cache-dir",
                str(tmp_path / "c"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "cannot listen" in out.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_a_lazily_unmounted_daemon_spares_its_successors_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon A is lazily unmounted while a file is open (it lives on to serve it); daemon B mounts
    at the same place and takes the socket name over. When A finally exits it must not remove B's
    socket: `status MNT` goes on answering for B (it once said "no blobmount daemon answers")."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    mnt = tmp_path / "mnt"
    with mounted(f"dir:{FIXTURES / 'basic'}", mnt) as a:
        held = open(mnt / "top.md", "rb")
        try:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=True, timeout=30)
            with mounted(f"dir:{FIXTURES / 'unicode'}", mnt, cache_dir=tmp_path / "b-cache") as b:
                assert a.proc.poll() is None, "A should live on while its file is open"
                first = status(mnt, "--json")
                assert first.returncode == 0, first.stderr
                assert json.loads(first.stdout)["pid"] == b.proc.pid
                assert held.read() == tree_files("basic")[b"top.md"].data  # A still serves it
                held.close()
                assert a.proc.wait(WAIT_S) == 0  # its last file closed: A's session ends
                after = status(mnt, "--json")
                assert after.returncode == 0, after.stderr
                st = json.loads(after.stdout)
                assert st["pid"] == b.proc.pid
                assert st["source"] == f"dir:{FIXTURES / 'unicode'}"
        finally:
            held.close()
