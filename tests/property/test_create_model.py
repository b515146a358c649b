"""`create` over random trees: the index's data_hash is the sha256 of the data blob written, every
entry's hash is its file's sha256 and reads back verified, and two runs write the same bytes.

File sizes cluster around every buffer and thread threshold of blobmount/create/ (the block size, the
inline-hashing limit, the skip-compression minimum, the read-buffer ring), raw and zstd, with names
the skip rule keeps raw; a wrong data_hash that changed from run to run (issue 13) came from a read
buffer reused while a hashing thread still read it, and only trees crossing those thresholds show it.

zstd runs on one thread and on several: the bytes must be the same. The parallel writer's limits
(memory budget before spilling, the buffer of the file being written, the queue ahead) are drawn
small as well as at their defaults, so that every path through it (memory, spool, waiting) runs."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from unittest import mock

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobmount.cache import ContentStore
from blobmount.create import CreateOptions, create_archive, files, parallel
from blobmount.create.options import SKIP_BELOW_BYTES
from blobmount.index import IndexView
from blobmount.reader import Reader
from blobmount.sources.local import open_directory

EXAMPLES = int(os.environ.get("BLOBMOUNT_FUZZ_EXAMPLES", "40"))
TREES = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=60),  # a hang guard, not a timing: one example takes well under a second
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_TREE_BYTES = 12 << 20  # keeps an example fast; still several blocks and ring turns per tree

_B = files.BLOCK_BYTES
_T = files.THREAD_HASH_MIN_BYTES
_S = SKIP_BELOW_BYTES
_RING = files.READ_BUFFERS * _B
EDGES = sorted(
    {0, 1, _S - 1, _S, _S + 1, _T - 1, _T, _T + 1, _B - 1, _B, _B + 1, 2 * _B + 1, _RING - 1, _RING, _RING + 1}
)
sizes = st.one_of(st.sampled_from(EDGES), st.integers(0, _RING + _B))
names = st.text(alphabet="abcdefgh", min_size=1, max_size=6)
extensions = st.sampled_from(["", ".txt", ".c", ".png", ".GZ", ".zst"])
kinds = st.sampled_from(["random", "text", "zeros"])
limits = st.fixed_dictionaries(
    {
        "PARALLEL_BUFFER_BYTES": st.sampled_from([0, _B // 2, _B + 1, parallel.PARALLEL_BUFFER_BYTES]),
        "HEAD_BUFFER_BYTES": st.sampled_from([1, _B, parallel.HEAD_BUFFER_BYTES]),
        "AHEAD": st.sampled_from([1, 2, parallel.AHEAD]),
    }
)
RUNS = (("none", 1), ("none", 1), ("zstd", 1), ("zstd", 2), ("zstd", 3))


def content(kind: str, size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "zeros":
        return bytes(size)
    words = [rng.randbytes(rng.randrange(1, 9)).hex().encode() for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


@st.composite
def trees(draw: st.DrawFn) -> dict[str, tuple[str, int, int]]:
    """path -> (kind, size, seed): small to print when an example fails; contents are made from it."""
    files: dict[str, tuple[str, int, int]] = {}
    total = 0
    for _ in range(draw(st.integers(1, 10))):
        depth = draw(st.integers(0, 2))
        path = "/".join([*(draw(names) for _ in range(depth)), draw(names) + draw(extensions)])
        if any(p == path or p.startswith(path + "/") or path.startswith(p + "/") for p in files):
            continue  # a file where a directory is (or the reverse) cannot be written
        size = min(draw(sizes), MAX_TREE_BYTES - total)
        files[path] = (draw(kinds), size, draw(st.integers(0, 1 << 16)))
        total += size
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)


def read_back(out: Path, cache: Path) -> tuple[IndexView, dict[str, bytes], dict[str, bytes]]:
    """The index, each entry's recorded hash, and each entry's bytes read back through the verifying
    reader (which decodes zstd and checks the sha256)."""
    opened = open_directory(out)
    view = IndexView(opened.index_bytes, blob_size=opened.data.size)
    reader = Reader(opened.data, ContentStore(cache))

    async def read_all() -> dict[str, bytes]:
        got = {}
        for i in range(len(view)):
            entry = view.entry(i)
            got[os.fsdecode(entry.path)] = b"".join([b async for b in reader.stream_verified(entry)])
        return got

    hashes = {os.fsdecode(view.entry(i).path): view.entry(i).hash for i in range(len(view))}
    try:
        return view, hashes, trio.run(read_all)
    finally:
        opened.data.close()


@TREES
@given(spec=trees(), patched=limits)
def test_create_writes_the_hashes_of_what_it_wrote(
    spec: dict[str, tuple[str, int, int]], patched: dict[str, int]
) -> None:
    files = {path: content(*made) for path, made in spec.items()}
    with tempfile.TemporaryDirectory(prefix="create-model-") as tmp, ExitStack() as stack:
        for name, value in patched.items():
            stack.enter_context(mock.patch.object(parallel, name, value))
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        write_tree(src, files)
        written: dict[str, tuple[bytes, bytes]] = {}
        for run, (compression, threads) in enumerate(RUNS):
            out = work / f"{run}-{compression}-{threads}"
            result = create_archive(src, out, CreateOptions(compression=compression, threads=threads))
            data = (out / "data.blob").read_bytes()
            assert result.data_sha256 == hashlib.sha256(data).hexdigest(), (compression, threads)
            view, hashes, got = read_back(out, work / f"cache-{run}")
            assert view.data_hash == hashlib.sha256(data).digest(), (compression, threads)
            assert hashes == {p: hashlib.sha256(d).digest() for p, d in files.items()}, (compression, threads)
            assert got == files, (compression, threads)
            index = (out / "index.blob").read_bytes()
            # every run of one compression writes the same bytes, on one thread or several
            assert written.setdefault(compression, (index, data)) == (index, data), (compression, threads)
            assert sorted(p.name for p in out.iterdir()) == ["data.blob", "index.blob"]  # no spool left
