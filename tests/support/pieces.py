"""The archive and the counting shared by tests/fuse/test_random_reads.py and its kernel-free twins
(tests/fs/test_pieces_twins.py): a raw 16 MiB file read at random offsets, a 4 MiB one read as a
stream, a small file first in the data blob (so no file starts on a piece boundary)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import trio

from blobmount.create import CreateOptions, create_archive
from blobmount.pieces import PIECE_BYTES
from blobmount.reference import Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support.servers import QuirkProxy, Registry

MIB = 1 << 20
BIG = 16 * MIB
SMALL = 5000
BLOB_SIZE = SMALL + BIG + 4 * MIB  # raw: the files' bytes, in path order
REPO = "random/reads"


@dataclass
class Pushed:
    repo: str
    files: dict[str, bytes]
    data_digest: str


def push_random_archive(registry: Registry, src: Path, out: Path) -> Pushed:
    rng = random.Random(26)
    files = {"a/big.bin": rng.randbytes(BIG), "b/stream.bin": rng.randbytes(4 * MIB), "0/small.txt": b"x" * SMALL}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    create_archive(str(src), str(out), CreateOptions("none"))
    trio.run(push_archive, out, Reference.parse(f"{registry.host}/{REPO}:v1"), RegistryOptions())
    digest = "sha256:" + hashlib.sha256((out / "data.blob").read_bytes()).hexdigest()
    return Pushed(REPO, files, digest)


def blob_ranges(proxy: QuirkProxy) -> list[tuple[int, int]]:
    """Range requests for blobs the proxy saw, as [start, end) (the 1-byte probe excluded)."""
    out = []
    for method, path, headers in list(proxy.state.seen):
        value = headers.get("range")
        if method == "GET" and value and "/blobs/" in path:
            first, last = (int(x) for x in value.removeprefix("bytes=").split("-"))
            if (first, last) != (0, 0):
                out.append((first, last + 1))
    return out


def piece_requests(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The requests that fetched pieces (the blob's short last chunk is not one)."""
    return [(a, b) for a, b in ranges if b - a <= 2 * PIECE_BYTES and b != BLOB_SIZE]


def far_offsets(count: int, size: int, seed: int = 1) -> list[int]:
    """4 KiB-aligned offsets, each more than a chunk away from the one before (a read near the
    previous one is taken for a stream: chunks and read-ahead, as before pieces)."""
    rng = random.Random(seed)
    out = [rng.randrange(1, size // 4096) * 4096]
    while len(out) < count:
        off = rng.randrange(1, size // 4096) * 4096
        if abs(off - out[-1]) > 2 * MIB:
            out.append(off)
    return out
