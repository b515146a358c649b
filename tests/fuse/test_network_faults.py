"""Network faults under a mounted registry archive (DESIGN tenet 3: never hang, never lie).

The daemon mounts through tests/support/faults.py's FaultProxy in front of the real docker-registry with
``--timeout 2``. Every fault is first met briefly (it clears by itself after one or two requests:
the read must succeed with the right bytes) and then persistently: the reads it hits end in EIO
within the hang guard (10x the timeout), an unfaulted file is served meanwhile, names still
resolve (ENOENT never comes from the network), and once the fault is cleared the very same files
read correctly without a remount (a transient fault never poisons a file).

Each phase reads one copy of every reader path: a small raw file (fetched whole), a small zstd
file (decoded in memory), a large zstd file (decoded at open into the content store), a raw file
verified whole before its first byte, and a large raw file served lazily (read at an offset).
Copies sit between 4 MiB pads, so that reading one never brings another's bytes in by read-ahead;
every fault asserts it was met (``hits``), so such a change fails loudly instead of passing.

``BLOBMOUNT_FAULT_REPORT=FILE`` appends one JSON line per fault (outcome, longest wait) to FILE.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import resolver
from tests.support.faults import Fault, FaultProxy, Kind, blob, path_prefix
from tests.support.mounts import Mount, mounted
from tests.support.netfaults import (
    CASES,
    HANG_GUARD_S,
    TIMEOUT_S,
    TOKEN_FAULTS,
    NetArchive,
    aim,
    expected,
    mid,
    push_net_archive,
    range_of,
    span,
    targets,
)
from tests.support.reads import Outcome, PendingRead, read_bounded
from tests.support.servers import Registry

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

REPO = "faults/net:v1"
REPORT = os.environ.get("BLOBMOUNT_FAULT_REPORT")


@pytest.fixture(scope="module")
def net_archive(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> NetArchive:
    return push_net_archive(registry, REPO, tmp_path_factory.mktemp("net-archive"))


def _start(mount: Mount, path: bytes) -> PendingRead:
    return PendingRead(mount.path / os.fsdecode(path), *span(path))


def _report(name: str, **fields: object) -> None:
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"fault": name, **fields}) + "\n")


def _check_names_resolve(mount: Mount, arc: NetArchive, paths: list[bytes]) -> None:
    """Metadata comes from the index: a network fault never turns a name into ENOENT."""
    for path in paths:
        assert os.stat(mount.path / os.fsdecode(path)).st_size == len(arc.placed[path].data)
    assert "base.txt" in os.listdir(mount.path)


def _assert_read(arc: NetArchive, path: bytes, out: Outcome) -> None:
    assert out.errno is None, f"{path!r}: {errno.errorcode.get(out.errno or 0)} where the bytes were due"
    assert out.data == expected(arc, path), f"{path!r}: wrong bytes"


def _assert_eio(path: bytes, out: Outcome) -> None:
    assert out.errno is not None, f"{path!r}: read succeeded under a persistent fault"
    assert out.errno == errno.EIO, f"{path!r}: {errno.errorcode.get(out.errno)} instead of EIO"


def _mount(proxy: FaultProxy, tmp_path: Path, **kw: object) -> contextlib.AbstractContextManager[Mount]:
    return mounted(f"{proxy.host}/{REPO}", tmp_path / "mnt", "--timeout", str(TIMEOUT_S), **kw)  # type: ignore[arg-type]


def _baseline(mount: Mount, arc: NetArchive) -> None:
    out = read_bounded(mount.path / "base.txt", HANG_GUARD_S)
    _assert_read(arc, b"base.txt", out)


@pytest.mark.parametrize("name", list(CASES))
def test_fault_on_some_files(name: str, fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path) -> None:
    case = CASES[name]
    arc = net_archive
    longest = 0.0
    with _mount(fault_proxy, tmp_path) as m:
        _baseline(m, arc)
        if case.brief is not None:  # met briefly: retried, the bytes are right
            faults = aim(fault_proxy, arc, case.brief, targets("1"))
            pending = {path: _start(m, path) for path in targets("1")}
            for path, p in pending.items():
                out = p.result(HANG_GUARD_S)
                longest = max(longest, out.longest_s)
                _assert_read(arc, path, out)
                assert faults[path].hits >= 1, f"{path!r}: the fault was never met"
            fault_proxy.clear()
        # persistent: EIO in time, the rest served meanwhile
        faults = aim(fault_proxy, arc, case.persistent, targets("2"))
        pending = {path: _start(m, path) for path in targets("2")}
        other = read_bounded(m.path / "other.bin", HANG_GUARD_S)
        _assert_read(arc, b"other.bin", other)
        _check_names_resolve(m, arc, targets("2"))
        for path, p in pending.items():
            out = p.result(HANG_GUARD_S)
            longest = max(longest, out.longest_s)
            _assert_eio(path, out)
            assert faults[path].hits >= 1, f"{path!r}: the fault was never met"
        fault_proxy.clear()
        for path in targets("2"):  # cleared: the same files, same mount, right bytes
            _assert_read(arc, path, _start(m, path).result(HANG_GUARD_S))
        log = m.log()
    assert "Traceback" not in log, log
    _report(name, longest_wait_s=round(longest, 3), brief="ok" if case.brief else None, persistent="EIO")


def _global_case(
    mount: Mount,
    arc: NetArchive,
    *,
    on: Callable[[], None],
    off: Callable[[], None],
    brief: bool = True,
    expect: int = errno.EIO,
) -> float:
    """A fault that takes the whole registry away: briefly (switched off again while the reads
    wait, early enough for their second or third attempt: they succeed), then for longer than
    --timeout (EIO), then cleared (the same files read)."""
    longest = 0.0
    _baseline(mount, arc)
    if brief:
        on()
        pending = {path: _start(mount, path) for path in targets("1")}
        time.sleep(TIMEOUT_S / 8)
        off()
        for path, p in pending.items():
            out = p.result(HANG_GUARD_S)
            longest = max(longest, out.longest_s)
            _assert_read(arc, path, out)
    on()
    try:
        pending = {path: _start(mount, path) for path in targets("2")}
        _check_names_resolve(mount, arc, targets("2"))
        for path, p in pending.items():
            out = p.result(HANG_GUARD_S)
            longest = max(longest, out.longest_s)
            assert out.errno == expect, f"{path!r}: {errno.errorcode.get(out.errno or 0)}, expected {expect}"
    finally:
        off()
    for path in targets("2"):
        _assert_read(arc, path, _start(mount, path).result(HANG_GUARD_S))
    return longest


def test_connection_refused(fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path) -> None:
    with _mount(fault_proxy, tmp_path) as m:
        longest = _global_case(m, net_archive, on=fault_proxy.down, off=fault_proxy.up)
    _report("connection-refused", longest_wait_s=round(longest, 3), brief="ok", persistent="EIO")


def test_dns_failure(fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path) -> None:
    """The daemon resolves registry.faults.test through tests/support/resolver.py (never a real lookup);
    DNS going away matters to new connections, so the proxy also cuts the live ones."""
    flag = tmp_path / "dns-down"
    env = resolver.sitecustomize_dir(tmp_path / "site", flag)
    host = f"registry{resolver.FAKE_SUFFIX}:{fault_proxy.port}"

    def dns_down() -> None:
        flag.touch()
        fault_proxy._cut_live()

    def dns_up() -> None:
        flag.unlink(missing_ok=True)

    seen_before = len(fault_proxy.state.seen)
    with mounted(f"{host}/{REPO}", tmp_path / "mnt", "--timeout", str(TIMEOUT_S), "--plain-http", host, env=env) as m:
        assert len(fault_proxy.state.seen) > seen_before  # the mount really went through the fake name
        longest = _global_case(m, net_archive, on=dns_down, off=dns_up)
        assert "resolution" in m.log() or "ConnectError" in m.log()
    _report("dns-failure", longest_wait_s=round(longest, 3), brief="ok", persistent="EIO")


@pytest.mark.parametrize("kind", list(TOKEN_FAULTS))
def test_token_endpoint_fails(kind: str, fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path) -> None:
    """Bearer tokens live 2 s, so the client (refreshing a quarter of a short token's life before
    it expires) asks for a new one for nearly every read: a failing token endpoint is met by every
    read."""
    make, expect, brief = TOKEN_FAULTS[kind]
    fault_proxy.state.bearer = True
    fault_proxy.state.token_lifetime_s = 2
    faults: list[Fault] = []

    def on() -> None:
        time.sleep(1.6)  # let the current token age past its refresh point (1.5 s)
        fault = make()
        fault.match = path_prefix("/token")
        faults.append(fault_proxy.add(fault))

    with _mount(fault_proxy, tmp_path) as m:
        longest = _global_case(m, net_archive, on=on, off=fault_proxy.clear, brief=brief, expect=expect)
    assert all(f.hits >= 1 for f in faults)
    _report(
        f"token-endpoint-{kind}",
        longest_wait_s=round(longest, 3),
        brief="ok" if brief else None,
        persistent=errno.errorcode[expect],
    )


def test_bits_flipped_in_transit(fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path) -> None:
    """A registry (or a middlebox) that corrupts a body while every header is right: verification
    catches it. Once: the file is read again and served right. Every time: EIO, and the file is
    poisoned for this mount (DESIGN section 5) with one log line naming both hashes."""
    arc = net_archive
    with _mount(fault_proxy, tmp_path) as m:
        for name in ("small.bin", "verified.bin"):  # verified before the first byte
            path = f"1/{name}".encode()
            match = blob(arc.data_digest, *range_of(arc, path))
            fault = fault_proxy.add(Fault(Kind.FLIP, match, times=1, at=mid(arc, path)))
            _assert_read(arc, path, _start(m, path).result(HANG_GUARD_S))
            assert fault.hits == 1
        fault_proxy.clear()
        path = b"2/small.bin"
        fault_proxy.add(Fault(Kind.FLIP, blob(arc.data_digest, *range_of(arc, path)), at=mid(arc, path)))
        _assert_eio(path, _start(m, path).result(HANG_GUARD_S))
        fault_proxy.clear()
        _assert_eio(path, _start(m, path).result(HANG_GUARD_S))  # poisoned: both reads disagreed
        assert os.getxattr(m.path / "2/small.bin", "user.blobmount.verified") == b"poisoned"
        # lazily verified: the flipped bytes are served as read (the policy), caught once all is
        # read: that read fails (the reader holds wrong bytes: it must not end in success), the
        # pages are dropped, the file is read again from the origin: the next read is right
        path = b"1/lazy.bin"
        placed = arc.placed[path]
        match = blob(arc.data_digest, placed.data_offset, placed.data_offset + 1)
        fault = fault_proxy.add(Fault(Kind.FLIP, match, times=1, at=placed.data_offset))
        first = read_bounded(m.path / "1/lazy.bin", HANG_GUARD_S)
        assert first.errno == errno.EIO or first.data == placed.data, "a full read ended in wrong bytes"
        assert fault.hits == 1
        for _ in range(50):  # the pages are dropped by a background task: bounded wait
            if os.getxattr(m.path / "1/lazy.bin", "user.blobmount.verified") == b"verified":
                break
            time.sleep(0.1)
        assert os.getxattr(m.path / "1/lazy.bin", "user.blobmount.verified") == b"verified"
        assert read_bounded(m.path / "1/lazy.bin", HANG_GUARD_S).data == placed.data
        log = m.log()
    bad = [ln for ln in log.splitlines() if "2/small.bin" in ln and "expected" in ln]
    assert len(bad) == 1, log
    assert hashlib.sha256(arc.placed[b"2/small.bin"].data).hexdigest() in bad[0]


@pytest.mark.parametrize("name", ["small.txt", "big.txt"])
def test_a_zstd_file_corrupted_once_in_transit_is_read_again(
    name: str, fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path
) -> None:
    arc = net_archive
    path = f"1/{name}".encode()
    with _mount(fault_proxy, tmp_path) as m:
        fault = fault_proxy.add(
            Fault(Kind.FLIP, blob(arc.data_digest, *range_of(arc, path)), times=1, at=mid(arc, path))
        )
        out = _start(m, path).result(HANG_GUARD_S)
        assert fault.hits == 1
        _assert_read(arc, path, out)


def test_daemon_killed_during_a_stalled_read(fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path) -> None:
    """kill -9 while a read waits on a stalled registry: the reader gets an error at once (never a
    hang), `fusermount3 -u` leaves a clean directory, and a new daemon mounts over it and serves."""
    import signal
    import subprocess

    from tests.support.mounts import is_mounted

    arc = net_archive
    path = b"2/small.bin"
    mnt = tmp_path / "mnt"
    with _mount(fault_proxy, tmp_path) as m:
        _baseline(m, arc)
        fault = fault_proxy.add(Fault(Kind.STALL, blob(arc.data_digest, *range_of(arc, path))))
        pending = _start(m, path)
        for _ in range(100):  # bounded: until the request is stalled at the proxy
            if fault.hits:
                break
            time.sleep(0.02)
        assert fault.hits
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(30)
        out = pending.result(HANG_GUARD_S)
        assert out.errno == errno.ENOTCONN, out
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == []
        fault_proxy.clear()
    with _mount(fault_proxy, tmp_path) as m:
        _assert_read(arc, path, _start(m, path).result(HANG_GUARD_S))
