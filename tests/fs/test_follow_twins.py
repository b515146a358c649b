"""Kernel-free twins of tests/fuse/test_follow.py and of the --follow test of
tests/fuse/test_kernel_cache.py: the mount's Follower runs beside the handlers (tests/support's
``serving(..., follow_interval_s=...)``), on archives pushed to the session's real registry (or
written to an OCI layout), and what the handlers answer is checked across the switch. The kernel's
invalidations after a switch are recorded rather than sent; the twins check they were asked for."""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
from pathlib import Path

import pytest
import trio

from blobmount.fs import ROOT_INO
from blobmount.manifest import archive_manifest
from blobmount.reader import ReaderConfig
from blobmount.reference import Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from blobmount.sources.oci_layout import write_oci_layout
from tests.support.aio import run
from tests.support.faults import Fault, FaultProxy, Kind
from tests.support.follow import SWITCH_WAIT_S, archive_of
from tests.support.handlers import (
    CTX,
    Served,
    answer,
    inode_of,
    list_dir,
    read_file,
    read_handle,
    serving,
    until,
    verified_state,
)
from tests.support.servers import QuirkProxy, Registry

MiB = 1 << 20
BIG = 8 * MiB
V1 = {"big.bin": os.urandom(BIG), "same.bin": os.urandom(BIG), "gone.txt": b"gone\n", "sub/keep.txt": b"keep\n"}
V2 = {"big.bin": os.urandom(BIG), "same.bin": V1["same.bin"], "new.txt": b"new\n", "sub/keep.txt": b"keep\n"}
FOLLOW_LOG = r"^blobmount\.(follow|fetch|remote|registry(\.\w+)*|sources|index(\.\w+)*): "


def _push(host: str, repo_tag: str, archive_dir: Path) -> str:
    ref = Reference.parse(f"{host}/{repo_tag}")
    return str(trio.run(functools.partial(push_archive, archive_dir, ref, RegistryOptions())))


async def _digest(s: Served) -> str:
    """What `served_digest` reads on a mount: the root's user.blobmount.digest."""
    return (await s.fs.getxattr(ROOT_INO, b"user.blobmount.digest", CTX)).decode()


async def _served(s: Served, digest: str) -> None:
    async def now() -> bool:
        return await _digest(s) == digest

    await until(now, f"no switch to {digest}", SWITCH_WAIT_S, poll_s=0.1)


async def _names(s: Served) -> list[str]:
    return sorted(e.name.decode() for e in (await list_dir(s.fs, ROOT_INO))[2:])


def test_follow_switches_atomically_and_fetches_only_what_changed(
    registry: Registry, quirk_proxy: QuirkProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="blobmount.follow")
    v1, v2 = archive_of(tmp_path, "v1", V1), archive_of(tmp_path, "v2", V2)
    d1 = _push(registry.host, "twins/follow:cur", v1)
    ref = f"127.0.0.1:{quirk_proxy.port}/twins/follow:cur"
    v2_index = "sha256:" + hashlib.sha256((v2 / "index.blob").read_bytes()).hexdigest()
    fetched = 0
    d2 = ""

    async def body() -> None:
        nonlocal fetched, d2
        async with serving(ref, tmp_path / "cache", follow_interval_s=1) as s:
            assert s.follower is not None
            assert await _digest(s) == d1
            assert await _names(s) == ["big.bin", "gone.txt", "same.bin", "sub"]
            for rel, data in V1.items():  # everything of v1 in the cache
                assert await read_file(s.fs, rel) == data, rel
            same_ino = await inode_of(s.fs, "same.bin")
            held_ino = await inode_of(s.fs, "big.bin")
            held = (await s.fs.open(held_ino, os.O_RDONLY, CTX)).fh
            first = bytes(await s.fs.read(held, 0, 64 << 10))
            mark = quirk_proxy.state.body_bytes_sent

            d2 = await trio.to_thread.run_sync(_push, registry.host, "twins/follow:cur", v2)
            await _served(s, d2)

            rest = await read_handle(s.fs, held, 64 << 10)
            assert isinstance(rest, bytes)
            assert first + rest == V1["big.bin"]  # the open file read v1 to its end
            assert (await s.fs.getattr(held_ino, CTX)).st_size == BIG
            await s.fs.release(held)
            assert await _names(s) == ["big.bin", "new.txt", "same.bin", "sub"]  # added, removed
            assert await answer(s.fs.lookup, ROOT_INO, b"gone.txt", CTX) == errno.ENOENT
            for rel, data in V2.items():
                assert await read_file(s.fs, rel) == data, rel
            assert await inode_of(s.fs, "same.bin") != same_ino  # every file of v2 has a new number
            fetched = quirk_proxy.state.body_bytes_sent - mark
            assert s.follower.info["switches"] == 1
            assert s.follower.info["refused"] is None
            assert s.follower.state.index_digest == v2_index
            # the kernel was told to forget the names it held and the ones that changed
            assert {(ROOT_INO, b"gone.txt"), (ROOT_INO, b"new.txt"), (ROOT_INO, b"big.bin")} <= set(s.forgotten)

    run(body)
    index = (v2 / "index.blob").stat().st_size
    assert fetched <= BIG + index + 2 * MiB, fetched  # the changed file and the index; same.bin not again
    assert fetched < BIG + BIG // 2, fetched
    switched = [r.getMessage() for r in caplog.records if "switched from" in r.getMessage()]
    assert len(switched) == 1, caplog.text
    assert d2 in switched[0]
    assert "1 added, 1 removed, 1 changed" in switched[0]


@pytest.mark.expect_log(FOLLOW_LOG)
def test_a_corrupt_new_archive_is_refused_while_the_old_one_serves(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    small = {"a.txt": b"one\n", "b.txt": b"two\n"}
    v1 = archive_of(tmp_path, "v1", small)
    d1 = _push(registry.host, "twins/follow-bad:cur", v1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.blob").write_bytes((v1 / "data.blob").read_bytes())
    (bad / "index.blob").write_bytes(b"this is not a flatbuffers index" * 8)
    v2 = archive_of(tmp_path, "v2", {"a.txt": b"one again\n"})

    async def refused() -> bool:
        return "refused" in caplog.text

    async def body() -> None:
        async with serving(f"{registry.host}/twins/follow-bad:cur", tmp_path / "cache", follow_interval_s=1) as s:
            assert s.follower is not None
            d_bad = await trio.to_thread.run_sync(_push, registry.host, "twins/follow-bad:cur", bad)
            await until(refused, "never refused", SWITCH_WAIT_S)
            await trio.sleep(3)  # three more checks: the same bad digest is not reported again
            assert await _digest(s) == d1
            assert await read_file(s.fs, "a.txt") == b"one\n"
            assert await _names(s) == ["a.txt", "b.txt"]
            lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            assert len(lines) == 1, lines
            assert d_bad in lines[0]
            assert s.follower.info["refused"] == d_bad
            d2 = await trio.to_thread.run_sync(_push, registry.host, "twins/follow-bad:cur", v2)  # a good one
            await _served(s, d2)
            assert await _names(s) == ["a.txt"]
            assert await read_file(s.fs, "a.txt") == b"one again\n"

    run(body)


def test_a_wake_checks_at_once(registry: Registry, tmp_path: Path) -> None:
    """SIGHUP's part in the daemon (Follower.wake): with an interval of an hour, nothing is checked
    until the wake; then the new archive is served at once."""
    v1 = archive_of(tmp_path, "v1", {"f.txt": b"v1\n"})
    v2 = archive_of(tmp_path, "v2", {"f.txt": b"v2\n"})
    d1 = _push(registry.host, "twins/follow-hup:cur", v1)

    async def body() -> None:
        async with serving(f"{registry.host}/twins/follow-hup:cur", tmp_path / "cache", follow_interval_s=3600) as s:
            assert s.follower is not None
            d2 = await trio.to_thread.run_sync(_push, registry.host, "twins/follow-hup:cur", v2)
            await trio.sleep(2)
            assert await _digest(s) == d1  # the interval is an hour: nothing checked yet
            s.follower.wake()
            await _served(s, d2)
            assert await read_file(s.fs, "f.txt") == b"v2\n"

    run(body)


def test_an_oci_layout_is_followed_through_its_index_json(tmp_path: Path) -> None:
    v1 = archive_of(tmp_path, "v1", {"f.txt": b"v1\n", "g.txt": b"g\n"})
    v2 = archive_of(tmp_path, "v2", {"f.txt": b"v2 longer\n"})
    layout = tmp_path / "layout"
    write_oci_layout(v1, f"{layout}:t", archive_manifest(v1, {}))

    async def body() -> None:
        async with serving(f"oci:{layout}:t", tmp_path / "cache", follow_interval_s=1) as s:
            before = await _digest(s)
            assert await read_file(s.fs, "f.txt") == b"v1\n"
            await trio.to_thread.run_sync(write_oci_layout, v2, f"{layout}:t", archive_manifest(v2, {}))

            async def moved() -> bool:
                return await _digest(s) != before

            await until(moved, "never switched", SWITCH_WAIT_S)
            assert await _names(s) == ["f.txt"]
            assert await read_file(s.fs, "f.txt") == b"v2 longer\n"

    run(body)


@pytest.mark.expect_log(FOLLOW_LOG)
def test_a_registry_failing_while_the_new_archive_is_fetched_is_retried_not_refused(
    registry: Registry, fault_proxy: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    v1 = archive_of(tmp_path, "v1", {"f.txt": b"v1\n"})
    v2 = archive_of(tmp_path, "v2", {"f.txt": b"v2\n"})
    d1 = _push(registry.host, "twins/follow-flaky:cur", v1)
    index_path = "/blobs/sha256:" + hashlib.sha256((v2 / "index.blob").read_bytes()).hexdigest()

    async def gave_up() -> bool:
        return "--follow: opening" in caplog.text

    async def body() -> None:
        ref = f"127.0.0.1:{fault_proxy.port}/twins/follow-flaky:cur"
        options = RegistryOptions(timeout_s=2.0)
        async with serving(
            ref, tmp_path / "cache", ReaderConfig(wait_s=2.0), options=options, follow_interval_s=1
        ) as s:
            assert s.follower is not None
            fault = fault_proxy.add(Fault(Kind.STATUS, match=lambda r: r.path.endswith(index_path), status=503))
            d2 = await trio.to_thread.run_sync(_push, registry.host, "twins/follow-flaky:cur", v2)
            await until(gave_up, "a check never gave up on the new index", SWITCH_WAIT_S)
            assert fault.hits >= 1
            assert await _digest(s) == d1
            assert s.follower.info["refused"] is None
            fault_proxy.clear()
            await _served(s, d2)
            assert await read_file(s.fs, "f.txt") == b"v2\n"

    run(body)
    assert "refused" not in caplog.text


def test_follow_in_no_open_mode_verifies_a_later_big_file_before_its_first_byte(tmp_path: Path) -> None:
    """The first archive (small files only) puts the filesystem in the no-open mode for good; a
    later archive's file above --verify-threshold is then verified whole before its first byte
    (no open reaches the daemon, so it could not be verified lazily), and a same-size change is
    read new (new inode)."""
    big = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(6 * 32768))  # 6 MiB
    v1 = archive_of(tmp_path, "v1", {"f.txt": b"version 1\n", "g.txt": b"g\n"})
    v2 = archive_of(tmp_path, "v2", {"f.txt": b"version 2\n", "big.bin": big})
    layout = tmp_path / "layout"
    write_oci_layout(v1, f"{layout}:t", archive_manifest(v1, {}))

    async def body() -> None:
        async with serving(f"oci:{layout}:t", tmp_path / "cache", decide_opens=True, follow_interval_s=1) as s:
            assert s.fs.skip_open  # the first archive holds no lazily verified file
            before = await _digest(s)
            old = await inode_of(s.fs, "f.txt")
            assert await answer(s.fs.open, old, os.O_RDONLY, CTX) == errno.ENOSYS
            assert await read_file(s.fs, "f.txt") == b"version 1\n"
            await trio.to_thread.run_sync(write_oci_layout, v2, f"{layout}:t", archive_manifest(v2, {}))

            async def moved() -> bool:
                return await _digest(s) != before

            await until(moved, "never switched", SWITCH_WAIT_S)
            assert s.fs.skip_open  # the kernel's mode is for the life of the mount
            assert await inode_of(s.fs, "f.txt") != old
            assert await read_file(s.fs, "f.txt") == b"version 2\n"
            assert await read_file(s.fs, "big.bin", 0, 4096) == big[:4096]
            # one page read, yet verified: the whole file was hashed before that first byte
            assert await verified_state(s.fs, "big.bin") == b"verified"

    run(body)
