"""The daemon's side rooms without a mount: addresses, socket naming and placement, the human summary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blobmount.daemon import control, http, status
from blobmount.errors import UsageError


def test_parse_address() -> None:
    assert http.parse_address(":9101") == (None, 9101)
    assert http.parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert http.parse_address("[::1]:9101") == ("::1", 9101)
    for bad in ("9101", "host:http", "host:70000"):
        with pytest.raises(UsageError):
            http.parse_address(bad)


def test_socket_name_resolves_the_parent_only(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    a = control.socket_name(tmp_path / "real" / "mnt")
    assert a == control.socket_name(tmp_path / "link" / "mnt")  # same mountpoint, same socket
    assert a == control.socket_name(f"{tmp_path}/real/./mnt")
    assert a != control.socket_name(tmp_path / "real" / "other")
    assert len(str(control.runtime_dir() / a)) < 108  # sun_path


def test_runtime_dir_follows_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/blobmount-assets:/run/other")
    assert control.runtime_dir() == Path("/run/blobmount-assets")
    assert Path("/run/blobmount-assets") / control.socket_name("/mnt/x") in control.candidate_sockets("/mnt/x")


def test_control_socket_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(PermissionError, match="not a private directory"):
        control._bind_unix(shared / "mnt-x.sock")
    private = tmp_path / "private"
    sock, _ = control._bind_unix(private / "mnt-x.sock")
    try:
        assert (private / "mnt-x.sock").stat().st_mode & 0o777 == 0o600
        assert private.stat().st_mode & 0o777 == 0o700
    finally:
        sock.close()


def test_an_exiting_daemon_removes_its_own_socket_only(tmp_path: Path) -> None:
    """A successor bound the same name (the first daemon was lazily unmounted and lived on): the
    first one's exit leaves the successor's socket alone; the successor's exit removes it."""
    path = tmp_path / "run" / "mnt-x.sock"
    first, first_own = control._bind_unix(path)
    second, second_own = control._bind_unix(path)  # takes the name over
    try:
        assert first_own != second_own
        control._unlink_own(path, first_own)
        assert path.exists()
        assert (path.lstat().st_dev, path.lstat().st_ino) == second_own
        control._unlink_own(path, second_own)
        assert not path.exists()
        control._unlink_own(path, second_own)  # gone already: nothing to do, no error
    finally:
        first.close()
        second.close()


def test_summary_is_one_fact_per_line() -> None:
    st = {
        "version": "0.1.0",
        "pid": 42,
        "mountpoint": "/mnt/a",
        "source": "reg/team/a:v3",
        "pinned": "reg/team/a@sha256:00",
        "index_digest": "sha256:11",
        "data_digest": "sha256:22",
        "entries": 3,
        "data_size_bytes": 3 << 30,
        "uptime_s": 3725.0,
        "ready": True,
        "cache": {
            "dir": "/c",
            "limit_bytes": 10 << 30,
            "used_bytes": 512 << 20,
            "hits": 9,
            "misses": 1,
            "hit_rate": 0.9,
            "evictions": 0,
        },
        "fetched": {
            "http_requests": 4,
            "http_bytes": 1 << 20,
            "retries": 1,
            "fetch_bytes": 0,
            "fetch_requests": 2,
            "coalescing_ratio": 4.0,
        },
        "served": {"fuse_requests": 100, "fuse_errors": 2, "read_bytes": 2 << 20},
        "metrics_url": None,
    }
    text = status.summary(st)
    assert "up 1h02m" in text
    assert "512.0 MiB of 10.0 GiB in /c" in text
    assert "90.0% (9 hits, 1 misses" in text
    assert "1.0 MiB in 4 HTTP requests (1 retries, 4.0 chunks/request)" in text
    assert "off (--metrics ADDR)" in text
    assert len(text.splitlines()) == 10
