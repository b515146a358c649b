"""Kernel-free twins of tests/fuse/test_network_faults.py: the same archive layout on the session's
real registry, behind the same FaultProxy, with the same faults (its CASES and TOKEN_FAULTS are
imported, so the two lists cannot drift), read through the handlers instead of a mount.

Each phase reads one copy of every reader path (a small raw file fetched whole, a small zstd file
decoded in memory, a large zstd file decoded into the store, a raw file verified whole before its
first byte, a large raw file served lazily, read at an offset): met briefly, the fault is retried
and the bytes are right; met persistently, each read answers EIO within the hang guard while an
unfaulted file is served and every name still resolves; cleared, the same files read right in the
same filesystem (a transient fault never poisons a file)."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

from blobmount.fs import ROOT_INO
from blobmount.reader import ReaderConfig
from blobmount.registry.client import RegistryOptions
from tests.support import resolver
from tests.support.aio import run
from tests.support.faults import Fault, FaultProxy, Kind, blob, path_prefix
from tests.support.handlers import CTX, Served, inode_of, list_dir, read_file, serving, until, verified_state
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
from tests.support.servers import Registry

REPO = "twins/net:v1"
# what a network fault makes the daemon say (retries, give-ups, EIO answers, the mismatch)
NET_LOG = r"^blobmount\.(fetch|remote|registry(\.\w+)*|reader|fs|streaming|flight|sources|decode): (?!unexpected error)"


@pytest.fixture(scope="module")
def net_archive(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> NetArchive:
    """test_network_faults.py's archive (tests/support/netfaults.py), in a repository of its own."""
    return push_net_archive(registry, REPO, tmp_path_factory.mktemp("net-twin-archive"))


def _serving(source: str, tmp_path: Path, plain_http: tuple[str, ...] = ()) -> AbstractAsyncContextManager[Served]:
    """Served as the mounted twin mounts it: ``--timeout 2`` (the registry's and the reader's)."""
    options = RegistryOptions(timeout_s=TIMEOUT_S, plain_http=plain_http)
    return serving(source, tmp_path / "cache", ReaderConfig(wait_s=TIMEOUT_S), options=options)


async def _read_all(s: Served, paths: list[bytes]) -> dict[bytes, bytes | int]:
    """Every path read at once (one task each, as the mounted twin's reader threads), bounded."""
    out: dict[bytes, bytes | int] = {}

    async def one(path: bytes) -> None:
        offset, size = span(path)
        out[path] = await read_file(s.fs, path, offset, size)

    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            for path in paths:
                nursery.start_soon(one, path)
    return out


async def _meanwhile(s: Served, arc: NetArchive, paths: list[bytes]) -> None:
    """While the faulted reads wait: an unfaulted file is served, and metadata comes from the
    index (a network fault never turns a name into ENOENT)."""
    assert await read_file(s.fs, "other.bin") == arc.placed[b"other.bin"].data
    for path in paths:
        attr = await s.fs.getattr(await inode_of(s.fs, path), CTX)
        assert attr.st_size == len(arc.placed[path].data)
    assert b"base.txt" in [e.name for e in await list_dir(s.fs, ROOT_INO)]


async def _is_verified(s: Served, path: bytes) -> bool:
    return await verified_state(s.fs, path) == b"verified"


def _assert_right(arc: NetArchive, got: dict[bytes, bytes | int]) -> None:
    for path, data in got.items():
        assert not isinstance(data, int), f"{path!r}: {errno.errorcode.get(data)} where the bytes were due"
        assert data == expected(arc, path), f"{path!r}: wrong bytes"


def _assert_eio(got: dict[bytes, bytes | int], expect: int = errno.EIO) -> None:
    for path, data in got.items():
        assert isinstance(data, int), f"{path!r}: read succeeded under a persistent fault"
        assert data == expect, f"{path!r}: {errno.errorcode.get(data)} instead of {errno.errorcode[expect]}"


async def _persistent(s: Served, arc: NetArchive, expect: int = errno.EIO) -> None:
    """The copy-2 reads under a fault that stays: `expect` for each, the rest served meanwhile."""
    got: dict[bytes, bytes | int] = {}

    async def reads() -> None:
        got.update(await _read_all(s, targets("2")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reads)
        await _meanwhile(s, arc, targets("2"))
    _assert_eio(got, expect)


@pytest.mark.expect_log(NET_LOG)
@pytest.mark.parametrize("name", list(CASES))
def test_fault_on_some_files(
    name: str, fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    case = CASES[name]
    arc = net_archive

    async def body() -> None:
        async with _serving(f"{fault_proxy.host}/{REPO}", tmp_path) as s:
            assert await read_file(s.fs, "base.txt") == arc.placed[b"base.txt"].data
            if case.brief is not None:  # met briefly: retried, the bytes are right
                faults = aim(fault_proxy, arc, case.brief, targets("1"))
                _assert_right(arc, await _read_all(s, targets("1")))
                assert all(f.hits >= 1 for f in faults.values()), "a fault was never met"
                fault_proxy.clear()
            # persistent: EIO in time, the rest served meanwhile
            faults = aim(fault_proxy, arc, case.persistent, targets("2"))
            await _persistent(s, arc)
            assert all(f.hits >= 1 for f in faults.values()), "a fault was never met"
            fault_proxy.clear()
            _assert_right(arc, await _read_all(s, targets("2")))  # cleared: the same files, right bytes

    run(body)
    assert "Traceback" not in caplog.text


async def _global_case(
    s: Served,
    arc: NetArchive,
    *,
    on: Callable[[], Awaitable[None]],
    off: Callable[[], Awaitable[None]],
    brief: bool = True,
    expect: int = errno.EIO,
) -> None:
    """test_network_faults.py's _global_case: the whole registry away briefly (back while the
    reads wait: they succeed), then for longer than --timeout (`expect`), then back (right)."""
    assert await read_file(s.fs, "base.txt") == arc.placed[b"base.txt"].data
    if brief:
        await on()
        got: dict[bytes, bytes | int] = {}

        async def reads() -> None:
            got.update(await _read_all(s, targets("1")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reads)
            await trio.sleep(TIMEOUT_S / 8)
            await off()
        _assert_right(arc, got)
    await on()
    try:
        persistent: dict[bytes, bytes | int] = {}

        async def faulted() -> None:
            persistent.update(await _read_all(s, targets("2")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(faulted)
            for path in targets("2"):  # names resolve while the registry is away
                attr = await s.fs.getattr(await inode_of(s.fs, path), CTX)
                assert attr.st_size == len(arc.placed[path].data)
        _assert_eio(persistent, expect)
    finally:
        await off()
    _assert_right(arc, await _read_all(s, targets("2")))


@pytest.mark.expect_log(NET_LOG)
def test_connection_refused(fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path) -> None:
    async def down() -> None:
        await trio.to_thread.run_sync(fault_proxy.down)

    async def up() -> None:
        await trio.to_thread.run_sync(fault_proxy.up)

    async def body() -> None:
        async with _serving(f"{fault_proxy.host}/{REPO}", tmp_path) as s:
            await _global_case(s, net_archive, on=down, off=up)

    run(body)


@pytest.mark.expect_log(NET_LOG)
def test_dns_failure(
    fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/support/resolver.py's resolver, installed in this process as the daemon's
    sitecustomize installs it there: registry.faults.test resolves to 127.0.0.1 until the flag
    file exists, then fails as a dead resolver does; the proxy also cuts the live connections."""
    import socket

    flag = tmp_path / "dns-down"
    monkeypatch.setattr(socket, "getaddrinfo", resolver.resolver(flag, socket.getaddrinfo))
    host = f"registry{resolver.FAKE_SUFFIX}:{fault_proxy.port}"

    async def dns_down() -> None:
        flag.touch()
        fault_proxy._cut_live()

    async def dns_up() -> None:
        flag.unlink(missing_ok=True)

    seen_before = len(fault_proxy.state.seen)

    async def body() -> None:
        async with _serving(f"{host}/{REPO}", tmp_path, plain_http=(host,)) as s:
            assert len(fault_proxy.state.seen) > seen_before  # it really went through the fake name
            await _global_case(s, net_archive, on=dns_down, off=dns_up)

    run(body)


@pytest.mark.expect_log(NET_LOG)
@pytest.mark.parametrize("kind", list(TOKEN_FAULTS))
def test_token_endpoint_fails(kind: str, fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path) -> None:
    """Bearer tokens live 2 s: a failing token endpoint is met by nearly every read; a refused
    one (401) is EACCES, the rest EIO."""
    make, expect, brief = TOKEN_FAULTS[kind]
    fault_proxy.state.bearer = True
    fault_proxy.state.token_lifetime_s = 2
    faults: list[Fault] = []

    async def on() -> None:
        await trio.sleep(1.6)  # let the current token age past its refresh point (1.5 s)
        fault = make()
        fault.match = path_prefix("/token")
        faults.append(fault_proxy.add(fault))

    async def off() -> None:
        fault_proxy.clear()

    async def body() -> None:
        async with _serving(f"{fault_proxy.host}/{REPO}", tmp_path) as s:
            await _global_case(s, net_archive, on=on, off=off, brief=brief, expect=expect)

    run(body)
    assert all(f.hits >= 1 for f in faults)


@pytest.mark.expect_log(NET_LOG)
def test_bits_flipped_in_transit(
    fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once: the file is read again and served right. Every time: EIO, poisoned, one log line
    naming both hashes. Lazily verified: the read that completes the file fails or is right,
    the file's pages are dropped, and it is read again from the origin: verified and right."""
    arc = net_archive

    async def body() -> None:
        async with _serving(f"{fault_proxy.host}/{REPO}", tmp_path) as s:
            for name in ("small.bin", "verified.bin"):  # verified before the first byte
                path = f"1/{name}".encode()
                fault = fault_proxy.add(
                    Fault(Kind.FLIP, blob(arc.data_digest, *range_of(arc, path)), times=1, at=mid(arc, path))
                )
                _assert_right(arc, await _read_all(s, [path]))
                assert fault.hits == 1
            fault_proxy.clear()
            path = b"2/small.bin"
            fault_proxy.add(Fault(Kind.FLIP, blob(arc.data_digest, *range_of(arc, path)), at=mid(arc, path)))
            _assert_eio(await _read_all(s, [path]))
            fault_proxy.clear()
            _assert_eio(await _read_all(s, [path]))  # poisoned: both reads disagreed
            ino = await inode_of(s.fs, path)
            assert await s.fs.getxattr(ino, b"user.blobmount.verified", CTX) == b"poisoned"
            path = b"1/lazy.bin"
            placed = arc.placed[path]
            match = blob(arc.data_digest, placed.data_offset, placed.data_offset + 1)
            fault = fault_proxy.add(Fault(Kind.FLIP, match, times=1, at=placed.data_offset))
            with trio.fail_after(HANG_GUARD_S):
                first = await read_file(s.fs, path)
            assert first == errno.EIO or first == placed.data, "a full read ended in wrong bytes"
            assert fault.hits == 1
            lazy = await inode_of(s.fs, path)
            # re-read from the origin in the background
            await until(lambda: _is_verified(s, path), "never verified", HANG_GUARD_S)
            assert lazy in s.dropped  # the pages the kernel may hold of it were dropped
            assert await read_file(s.fs, path) == placed.data

    run(body)
    bad = [r.getMessage() for r in caplog.records if "2/small.bin" in r.getMessage() and "expected" in r.getMessage()]
    assert len(bad) == 1, caplog.text
    assert hashlib.sha256(arc.placed[b"2/small.bin"].data).hexdigest() in bad[0]


@pytest.mark.expect_log(NET_LOG)
@pytest.mark.parametrize("name", ["small.txt", "big.txt"])
def test_a_zstd_file_corrupted_once_in_transit_is_read_again(
    name: str, fault_proxy: FaultProxy, net_archive: NetArchive, tmp_path: Path
) -> None:
    arc = net_archive
    path = f"1/{name}".encode()

    async def body() -> None:
        async with _serving(f"{fault_proxy.host}/{REPO}", tmp_path) as s:
            fault = fault_proxy.add(
                Fault(Kind.FLIP, blob(arc.data_digest, *range_of(arc, path)), times=1, at=mid(arc, path))
            )
            _assert_right(arc, await _read_all(s, [path]))
            assert fault.hits == 1

    run(body)
