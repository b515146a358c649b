"""The archive and faults of tests/fuse/test_network_faults.py and of its kernel-free twin
(tests/fs/test_network_twins.py), written once so the two cannot drift: what each copy of the
archive holds, where each read lands in the data blob, and how each fault is made briefly and
persistently."""

from __future__ import annotations

import errno
import functools
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from blobmount.reference import Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support.corpus import Placed, Spec, write_archive
from tests.support.faults import Fault, FaultProxy, Kind, blob
from tests.support.servers import Registry

KiB, MiB = 1 << 10, 1 << 20
TARGETS = ("small.bin", "small.txt", "big.txt", "verified.bin", "lazy.bin")
LAZY_READ = (5 * MiB, 256 * KiB)  # (offset, size) read of lazy.bin: not its head
TIMEOUT_S = 2.0  # --timeout of every mount (and of the twins' registry client and reader)
HANG_GUARD_S = 10 * TIMEOUT_S
PAD_BYTES = 4 * MiB


@dataclass(frozen=True, slots=True)
class NetArchive:
    placed: dict[bytes, Placed]
    data_digest: str


def _text(lines: int, salt: int) -> bytes:
    return b"".join(b"line %08d of compressible file %d\n" % (i, salt) for i in range(lines))


def push_net_archive(registry: Registry, repo: str, out: Path) -> NetArchive:
    """Every reader path three times (1: brief faults, 2: persistent faults, 3: spare for global
    faults), between 4 MiB pads, so that reading one never brings another's bytes in by
    read-ahead; written to `out` and pushed to `repo` (name:tag)."""
    rng = random.Random(7)
    specs = [Spec(b"base.txt", b"the baseline\n" * 50)]
    for copy in ("1", "2", "3"):
        for name in TARGETS:
            path = f"{copy}/{name}".encode()
            specs.append(Spec(f"{copy}/pad-{name}".encode(), bytes(PAD_BYTES)))
            if name == "small.bin":
                specs.append(Spec(path, rng.randbytes(200 * KiB)))
            elif name == "small.txt":
                specs.append(Spec(path, _text(18_000, int(copy)), zstd=True))  # ~650 KiB
            elif name == "big.txt":
                specs.append(Spec(path, _text(90_000, int(copy)), zstd=True))  # ~3.2 MiB
            elif name == "verified.bin":
                specs.append(Spec(path, rng.randbytes(3 * MiB)))
            else:
                specs.append(Spec(path, rng.randbytes(12 * MiB)))
    specs += [Spec(b"pad-other", bytes(PAD_BYTES)), Spec(b"other.bin", rng.randbytes(300 * KiB))]
    placed = write_archive(out, specs)
    ref = Reference.parse(f"{registry.host}/{repo}")
    trio.run(functools.partial(push_archive, out, ref, RegistryOptions()))
    return NetArchive(placed, "sha256:" + hashlib.sha256((out / "data.blob").read_bytes()).hexdigest())


def targets(copy: str) -> list[bytes]:
    return [f"{copy}/{name}".encode() for name in TARGETS]


def span(path: bytes) -> tuple[int, int | None]:
    """(offset, size) of the read each phase makes of `path` (None: to its end)."""
    return LAZY_READ if path.endswith(b"lazy.bin") else (0, None)


def expected(arc: NetArchive, path: bytes) -> bytes:
    data = arc.placed[path].data
    offset, size = span(path)
    return data if size is None else data[offset : offset + size]


def range_of(arc: NetArchive, path: bytes) -> tuple[int, int]:
    """The blob range that read of `path` fetches (a fault aimed at it matches it)."""
    p = arc.placed[path]
    offset, size = span(path)
    if size is None:
        return p.data_offset, p.data_offset + p.data_size
    return p.data_offset + offset, p.data_offset + offset + size


def mid(arc: NetArchive, path: bytes) -> int:
    """A blob offset inside that range (where a flipped bit must land to matter)."""
    start, end = range_of(arc, path)
    return (start + end) // 2


@dataclass(frozen=True)
class Case:
    """How to make one fault, persistently and briefly (None: it has no brief form)."""

    persistent: Callable[[], Fault]
    brief: Callable[[], Fault] | None


CASES: dict[str, Case] = {
    "reset-mid-body": Case(lambda: Fault(Kind.RESET), lambda: Fault(Kind.RESET, times=1)),
    "truncated-body": Case(lambda: Fault(Kind.TRUNCATE), lambda: Fault(Kind.TRUNCATE, times=1)),
    "stall-before-headers": Case(lambda: Fault(Kind.STALL), lambda: Fault(Kind.STALL, stall_s=0.5, times=1)),
    "stall-mid-body": Case(lambda: Fault(Kind.STALL_BODY), lambda: Fault(Kind.STALL_BODY, stall_s=0.5, times=1)),
    "slow-drip-1KiB/s": Case(lambda: Fault(Kind.DRIP, rate_bps=1024), None),
    "500": Case(lambda: Fault(Kind.STATUS, status=500), lambda: Fault(Kind.STATUS, status=500, times=2)),
    "502": Case(lambda: Fault(Kind.STATUS, status=502), lambda: Fault(Kind.STATUS, status=502, times=2)),
    "503": Case(lambda: Fault(Kind.STATUS, status=503), lambda: Fault(Kind.STATUS, status=503, times=2)),
    "429-retry-after": Case(
        lambda: Fault(Kind.STATUS, status=429, retry_after="30"),  # longer than --timeout: EIO in time
        lambda: Fault(Kind.STATUS, status=429, retry_after="1", times=1),
    ),
    "wrong-content-range": Case(lambda: Fault(Kind.CONTENT_RANGE), lambda: Fault(Kind.CONTENT_RANGE, times=1)),
    "body-longer-than-asked": Case(lambda: Fault(Kind.LONGER), lambda: Fault(Kind.LONGER, times=1)),
    "redirect-loop": Case(lambda: Fault(Kind.REDIRECT_LOOP), lambda: Fault(Kind.REDIRECT_LOOP, times=2)),
    "closed-without-answer": Case(lambda: Fault(Kind.CLOSE), lambda: Fault(Kind.CLOSE, times=1)),
    "404-for-the-blob": Case(lambda: Fault(Kind.STATUS, status=404), None),
}


TOKEN_FAULTS: dict[str, tuple[Callable[[], Fault], int, bool]] = {  # fault, errno, brief one survived
    "500": (lambda: Fault(Kind.STATUS, status=500), errno.EIO, True),
    "stall": (lambda: Fault(Kind.STALL), errno.EIO, True),
    "closed": (lambda: Fault(Kind.CLOSE), errno.EIO, True),
    "401": (lambda: Fault(Kind.STATUS, status=401), errno.EACCES, False),  # credentials refused
}


def aim(proxy: FaultProxy, arc: NetArchive, make: Callable[[], Fault], paths: list[bytes]) -> dict[bytes, Fault]:
    """A fault made by `make` for each path, matching the blob range its read fetches, added to
    `proxy`: by path (each must be met: ``hits``)."""
    faults = {}
    for path in paths:
        fault = make()
        fault.match = blob(arc.data_digest, *range_of(arc, path))
        faults[path] = proxy.add(fault)
    return faults
