"""Lazily verified files never end a full read with wrong bytes and success (issue: one flip in
one open, flips across opens, a remount over a cache that holds a corrupted chunk), and a file whose
fetch stalled reads at once when the origin answers again.

Real programs (``cp``, ``sha256sum``, ``head``, ``tail``) read through a real FUSE mount of an
archive on the real docker-registry, behind tests/support/faults.py's FaultProxy, which flips one bit of
one range answer on the way. ``--verify-threshold 256K`` makes files of a few MiB lazy. Each file
sits between pads, so a flip aimed at one file never lands in another's chunks, and every fault
asserts it was met (``hits``).

The rule every test checks: a program that reads a file to its end either gets the right bytes or
fails (EIO, exit status non-zero); once the fault is gone, the next read gets the right bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.faults import Fault, FaultProxy, Kind, blob
from tests.support.mounts import Mount, mounted
from tests.support.reads import read_bounded
from tests.support.servers import Registry
from tests.support.trust import (
    CHUNK,
    FILE_BYTES,
    SIZES,
    TRUST_THRESHOLD,
    TRUST_TIMEOUT_S,
    MiB,
    TrustArchive,
    flip_once,
    push_trust_archive,
)

pytestmark = pytest.mark.fuse

NAMES = tuple(SIZES)
REPO = "trust/lazy:v1"
TIMEOUT_S = TRUST_TIMEOUT_S
GUARD_S = 60.0  # hang guard for one program run
ARGS = ("--verify-threshold", TRUST_THRESHOLD, "--timeout", str(TIMEOUT_S))


@pytest.fixture(scope="module")
def trust_archive(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> TrustArchive:
    return push_trust_archive(registry, REPO, tmp_path_factory.mktemp("trust-archive"))


def _mount(proxy: FaultProxy, mnt: Path, cache: Path) -> contextlib.AbstractContextManager[Mount]:
    return mounted(f"{proxy.host}/{REPO}", mnt, *ARGS, cache_dir=cache)


def _sha256sum(path: Path) -> tuple[int, str]:
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, timeout=GUARD_S, check=False)
    return out.returncode, out.stdout.split(" ", 1)[0] if out.returncode == 0 else ""


def _assert_right_or_failed(program: str, code: int, got: str, want: str) -> bool:
    """The promise: exit 0 only with the right bytes. Returns whether they were right."""
    assert code != 0 or got == want, f"{program} exited 0 with wrong bytes"
    return code == 0


def _assert_right_soon(path: Path, want: str) -> None:
    """After a failed read, the next one is right (a re-verification may be under way: it is
    waited for by the read itself; two tries at most)."""
    for _ in range(2):
        code, got = _sha256sum(path)
        if code == 0:
            assert got == want, "a read after the fault got wrong bytes"
            return
    pytest.fail(f"{path}: still failing after the fault was gone")


def _verified(path: Path) -> bytes:
    return os.getxattr(path, "user.blobmount.verified")


def _wait_verified(path: Path, guard_s: float = 20.0) -> None:
    deadline = time.monotonic() + guard_s
    while _verified(path) != b"verified":
        assert time.monotonic() < deadline, f"{path}: still {_verified(path)!r}"
        time.sleep(0.05)


def _settle() -> None:
    """FUSE sends RELEASE after close() returns: give it a moment, so the next open is a new
    one rather than one that overlaps the last (the point of the test)."""
    time.sleep(0.3)


@pytest.mark.parametrize(
    ("program", "policy"), [("cp", "lazy"), ("sha256sum", "lazy"), ("cp", "background"), ("cp", "strict")]
)
def test_one_flip_in_one_full_read(
    program: str, policy: str, fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path
) -> None:
    arc = trust_archive
    name = "one.bin"
    data = arc.placed[name.encode()].data
    want = hashlib.sha256(data).hexdigest()
    source = f"{fault_proxy.host}/{REPO}"
    with mounted(source, tmp_path / "mnt", *ARGS, "--verify", policy, cache_dir=tmp_path / "cache") as m:
        fault, _ = flip_once(fault_proxy, arc, name, 0.5)
        path = m.path / name
        if program == "cp":
            copy = tmp_path / "copy"
            out = subprocess.run(["cp", str(path), str(copy)], capture_output=True, timeout=GUARD_S, check=False)
            got = hashlib.sha256(copy.read_bytes()).hexdigest() if copy.exists() else ""
            code = out.returncode
        else:
            code, got = _sha256sum(path)
        assert fault.hits == 1, "the flip was never met"
        if not _assert_right_or_failed(program, code, got, want):
            assert "sha256 mismatch" in m.log()
        _assert_right_soon(path, want)
        _wait_verified(path)
        assert read_bounded(path, GUARD_S).data == data
        log = m.log()
    assert "poisoned" not in log, log
    assert "Traceback" not in log, log


def test_a_flip_in_a_partial_read_then_a_full_read_in_another_process(
    fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path
) -> None:
    arc = trust_archive
    name = "two.bin"
    data = arc.placed[name.encode()].data
    want = hashlib.sha256(data).hexdigest()
    with _mount(fault_proxy, tmp_path / "mnt", tmp_path / "cache") as m:
        path = m.path / name
        fault, _ = flip_once(fault_proxy, arc, name, 0.25)
        head = subprocess.run(
            ["head", "-c", str(FILE_BYTES * 6 // 10), str(path)],
            stdout=subprocess.DEVNULL,
            timeout=GUARD_S,
            check=False,
        )
        assert fault.hits == 1, "the flip was never met"
        assert head.returncode == 0  # a partial read may get unverified bytes: the lazy policy
        fault_proxy.clear()
        _settle()
        code, got = _sha256sum(path)
        _assert_right_or_failed("sha256sum", code, got, want)
        _assert_right_soon(path, want)
        _wait_verified(path)
        assert "Traceback" not in m.log()


def test_a_file_read_in_pieces_by_two_processes_is_verified(
    fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path
) -> None:
    """Neither process reads the whole file; together they do. The flip in the first piece is
    found once the second piece completes the file (that read may fail), the file is read again
    from the origin, and then it is verified and right."""
    arc = trust_archive
    name = "pieces.bin"
    data = arc.placed[name.encode()].data
    half = FILE_BYTES // 2
    with _mount(fault_proxy, tmp_path / "mnt", tmp_path / "cache") as m:
        path = m.path / name
        fault, _ = flip_once(fault_proxy, arc, name, 0.25)
        first = subprocess.run(
            ["head", "-c", str(half), str(path)], stdout=subprocess.DEVNULL, timeout=GUARD_S, check=False
        )
        assert first.returncode == 0
        assert fault.hits == 1
        fault_proxy.clear()
        _settle()
        subprocess.run(  # may fail (the read that completes the file finds the mismatch)
            ["tail", "-c", str(FILE_BYTES - half), str(path)], stdout=subprocess.DEVNULL, timeout=GUARD_S, check=False
        )
        _wait_verified(path)
        code, got = _sha256sum(path)
        assert (code, got) == (0, hashlib.sha256(data).hexdigest())
        assert "sha256 mismatch" in m.log()


def test_a_file_read_in_part_and_closed_is_verified_from_the_cache(
    fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path
) -> None:
    """--prefetch brings the file into the cache with a flipped bit; a program reads part of it and
    closes it. Nobody reads the rest, yet the file is checked (the rest is in the cache: hashing it
    costs no request), found wrong, read again from the origin: verified, and right."""
    arc = trust_archive
    name = "part.bin"
    data = arc.placed[name.encode()].data
    fault, _ = flip_once(fault_proxy, arc, name, 0.25)
    args = ("--prefetch", name)
    with mounted(f"{fault_proxy.host}/{REPO}", tmp_path / "mnt", *ARGS, *args, cache_dir=tmp_path / "cache") as m:
        path = m.path / name
        stored = int(os.getxattr(path, "user.blobmount.stored_size"))
        deadline = time.monotonic() + 20
        while int(os.getxattr(path, "user.blobmount.cached_bytes")) < stored:
            assert time.monotonic() < deadline, "--prefetch did not bring the file in"
            time.sleep(0.05)
        assert fault.hits == 1
        fault_proxy.clear()
        head = subprocess.run(
            ["head", "-c", str(FILE_BYTES // 2), str(path)], stdout=subprocess.DEVNULL, timeout=GUARD_S, check=False
        )
        assert head.returncode == 0
        _wait_verified(path)
        assert _sha256sum(path) == (0, hashlib.sha256(data).hexdigest())
        assert "read in part and closed" in m.log()


def test_a_remount_over_a_cache_holding_a_corrupted_chunk(
    fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path
) -> None:
    """The first mount serves a flipped chunk to a partial read and goes away before the file's
    end was ever at hand (its tail stalls), so the mismatch is not found there. The next mount
    over the same cache must not trust that chunk: its first full read is right or fails."""
    arc = trust_archive
    name = "remount.bin"
    placed = arc.placed[name.encode()]
    data = placed.data
    want = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    with _mount(fault_proxy, tmp_path / "m1", cache) as m:
        path = m.path / name
        fault, at = flip_once(fault_proxy, arc, name, 0.05)
        tail = placed.data_offset + 4 * MiB
        fault_proxy.add(Fault(Kind.STALL, blob(arc.data_digest, tail, placed.data_offset + placed.data_size)))
        head = subprocess.run(
            ["head", "-c", str(MiB), str(path)], stdout=subprocess.DEVNULL, timeout=GUARD_S, check=False
        )
        assert head.returncode == 0
        assert fault.hits == 1
        chunk = at // CHUNK
        deadline = time.monotonic() + 10
        while not [p for p in (cache / "chunks").rglob(str(chunk)) if p.is_file()]:
            assert time.monotonic() < deadline, "the flipped chunk never reached the disk cache"
            time.sleep(0.05)
        _settle()
        assert _verified(path) == b"unverified"
        assert "sha256 mismatch" not in m.log()  # the premise: this mount never found it
    fault_proxy.clear()
    with _mount(fault_proxy, tmp_path / "m2", cache) as m:
        path = m.path / name
        code, got = _sha256sum(path)
        _assert_right_or_failed("sha256sum", code, got, want)
        _assert_right_soon(path, want)
        assert "Traceback" not in m.log()
    with _mount(fault_proxy, tmp_path / "m3", cache) as m:
        assert _sha256sum(m.path / name) == (0, want)


def test_a_stalled_file_reads_again_as_soon_as_the_origin_answers(
    fault_proxy: FaultProxy, trust_archive: TrustArchive, tmp_path: Path
) -> None:
    """The stalled connection stays dead after the fault clears (a blackholed link: nothing ends
    it but a deadline). The read that waited --timeout gets EIO and takes the request it waited
    for with it: no retry keeps a dead request open that a later read would join and wait out;
    the next read sends its own request and is served at once."""
    arc = trust_archive
    p = arc.placed[b"stall.bin"]
    at = p.data_offset + MiB + 7
    with _mount(fault_proxy, tmp_path / "mnt", tmp_path / "cache") as m:
        path = m.path / "stall.bin"
        fault = fault_proxy.add(Fault(Kind.STALL, blob(arc.data_digest, at, at + 1), stall_s=60, outlives_clear=True))
        first = read_bounded(path, 4 * TIMEOUT_S, offset=MiB + 7, size=4096)
        assert first.errno == errno.EIO
        assert fault.hits >= 1
        # nobody waits for those bytes now: for a while (longer than any retry pause), no request
        # for them stays open or is sent again
        for _ in range(25):  # the proxy notices a hang-up within its 20 ms poll
            if fault.stalled == 0:
                break
            time.sleep(0.02)
        hits = fault.hits
        for _ in range(30):
            assert fault.stalled == 0, "a request nobody waits for is still open"
            time.sleep(0.05)
        assert fault.hits == hits, "a request nobody waits for was sent again"
        fault_proxy.clear()  # new requests pass; a stalled one would stay stalled
        seen = len(fault_proxy.state.seen)
        second = read_bounded(path, 4 * TIMEOUT_S, offset=MiB + 7, size=4096)
        assert second.errno is None, f"re-read after the stall cleared: {errno.errorcode.get(second.errno or 0)}"
        assert second.data == p.data[MiB + 7 : MiB + 7 + 4096]
        fresh = [h for _m, _p, h in fault_proxy.state.seen[seen:] if h.get("range")]
        assert fresh, "the re-read was served without a request of its own"
        assert "Traceback" not in m.log()
