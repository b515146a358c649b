"""The archives of tests/fuse/test_lazy_trust.py and tests/fuse/test_lazy.py and of their
kernel-free twins (tests/fs/test_trust_twins.py), written once so the two cannot drift.

The trust archive: files of a few MiB, lazily verified under ``--verify-threshold 256K``, each
between pads, so a flip aimed at one file (:func:`flip_once`) never lands in another's chunks.
The lazy archive: a 24 MiB file, a 4 MiB one and a thousand small ones, stored raw.
"""

from __future__ import annotations

import functools
import hashlib
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

from blobmount.create import CreateOptions, create_archive
from blobmount.reference import Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support.corpus import Placed, Spec, write_archive
from tests.support.faults import Fault, FaultProxy, Kind, blob
from tests.support.mounts import blobmount_cmd
from tests.support.servers import QuirkProxy, Registry

KiB, MiB = 1 << 10, 1 << 20
CHUNK = MiB  # the default chunk size

# -- the trust archive --------------------------------------------------------------------------

FILE_BYTES = 3 * MiB + 12345  # lazy under --verify-threshold 256K; a few chunks
SIZES = {"one.bin": FILE_BYTES, "two.bin": FILE_BYTES, "pieces.bin": FILE_BYTES, "part.bin": FILE_BYTES}
SIZES |= {"remount.bin": 8 * MiB + 777, "stall.bin": FILE_BYTES}
TRUST_TIMEOUT_S = 3.0  # --timeout of the trust tests
TRUST_THRESHOLD = "256K"  # their --verify-threshold


@dataclass(frozen=True, slots=True)
class TrustArchive:
    placed: dict[bytes, Placed]
    data_digest: str


def push_trust_archive(registry: Registry, repo: str, out: Path) -> TrustArchive:
    """The trust archive, written to `out` and pushed to `repo` (name:tag)."""
    rng = random.Random(13)
    specs = []
    for name, size in SIZES.items():
        specs.append(Spec(f"pad-{name}".encode(), bytes(2 * MiB)))
        specs.append(Spec(name.encode(), rng.randbytes(size)))
    specs.append(Spec(b"pad-end", bytes(2 * MiB)))
    placed = write_archive(out, specs)
    trio.run(functools.partial(push_archive, out, Reference.parse(f"{registry.host}/{repo}"), RegistryOptions()))
    return TrustArchive(placed, "sha256:" + hashlib.sha256((out / "data.blob").read_bytes()).hexdigest())


def flip_once(proxy: FaultProxy, arc: TrustArchive, name: str, at_fraction: float) -> tuple[Fault, int]:
    """One bit flipped, once, in the answer that carries byte `at_fraction` of the file: the
    fault and the blob offset of that byte."""
    p = arc.placed[name.encode()]
    at = p.data_offset + int(p.data_size * at_fraction)
    return proxy.add(Fault(Kind.FLIP, blob(arc.data_digest, at, at + 1), times=1, at=at)), at


# -- the lazy archive ---------------------------------------------------------------------------

BIG = 24 * MiB
SMALL_FILES = 1000
SMALL_BYTES = 16 << 10


@dataclass
class LazyArchive:
    repo: str  # repository on the session registry
    digest: str  # manifest digest
    files: dict[str, bytes]
    data_size: int


def push_lazy_archive(registry: Registry, repo: str, src: Path, out: Path) -> LazyArchive:
    """The lazy archive's tree written to `src`, created in `out` (stored raw), pushed to `repo`:v1."""
    rng = random.Random(5)
    files = {"big.bin": rng.randbytes(BIG), "other/blob.bin": rng.randbytes(4 * MiB)}
    for i in range(SMALL_FILES):
        files[f"small/f{i:04}.txt"] = rng.randbytes(SMALL_BYTES)
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    result = create_archive(str(src), str(out), CreateOptions("none"))
    digest = trio.run(push_archive, out, Reference.parse(f"{registry.host}/{repo}:v1"), RegistryOptions())
    return LazyArchive(repo, str(digest), files, result.data_size)


def ranges(quirk_proxy: QuirkProxy) -> list[tuple[int, int]]:
    """Range requests for the data blob seen by the proxy, as [start, end) (the 1-byte probe excluded)."""
    out = []
    for method, _path, headers in list(quirk_proxy.state.seen):
        value = headers.get("range")
        if method == "GET" and value:
            first, last = (int(x) for x in value.removeprefix("bytes=").split("-"))
            if (first, last) != (0, 0):
                out.append((first, last + 1))
    return out


def prefetch_small(ref: str, cache: Path) -> str:
    """``blobmount prefetch REF small --cache-dir CACHE`` (the small files, before going offline):
    its output, once it succeeded."""
    cmd = blobmount_cmd("prefetch", ref, "small", "--cache-dir", str(cache))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout
