"""A cache directory written by an earlier release is read, not refetched and not misread.

``tests/fixtures/cache-v1/mixed.tar.gz`` is the cache directory that main at 4c97aab (the release
before sub-chunk fetches) left after reading every file of the go-reference ``mixed`` archive from
a registry, keeping two of its five chunks (0 and 4) and dropping the rest and its decoded-file
store, so that the mount must both use what the old release wrote and fetch what it lacks. The
chunk file format (bytes + xxh3 trailer + magic ``BMCHNK01``) is the version: a chunk without it,
or whose checksum fails, is a miss and is fetched again, never served."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest

from tests.support.helpers import tree_files
from tests.support.mounts import mounted
from tests.support.servers import QuirkProxy

pytestmark = pytest.mark.fuse

OLD_CACHE = Path(__file__).resolve().parents[1] / "fixtures" / "cache-v1" / "mixed.tar.gz"
CHUNK = 1 << 20
DATA_SIZE = 4765703  # the mixed fixture's data blob
KEPT = (0, 4)  # the chunks the old cache holds


def _ranges(proxy: QuirkProxy) -> list[tuple[int, int]]:
    out = []
    for method, _path, headers in list(proxy.state.seen):
        value = headers.get("range")
        if method == "GET" and value and "/blobs/" in _path:
            first, last = (int(x) for x in value.removeprefix("bytes=").split("-"))
            if (first, last) != (0, 0):  # the 1-byte probe
                out.append((first, last + 1))
    return out


def _old_cache(dest: Path) -> Path:
    with tarfile.open(OLD_CACHE) as tar:
        tar.extractall(dest, filter="data")
    return dest


def test_a_cache_written_by_the_previous_release_serves_its_chunks(
    pushed: dict[str, str], quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    cache = _old_cache(tmp_path / "cache")
    ref = pushed["mixed@"].replace(pushed["mixed@"].split("/", 1)[0], quirk_proxy.host, 1)
    files = tree_files("mixed")
    with mounted(ref, tmp_path / "mnt", "--timeout", "30", cache_dir=cache) as m:
        for rel, want in files.items():
            got = (m.path / os.fsdecode(rel)).read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(want.data).digest(), rel
    fetched = _ranges(quirk_proxy)
    assert fetched, "the chunks the old cache lacks were fetched"
    kept = [(i * CHUNK, min((i + 1) * CHUNK, DATA_SIZE)) for i in KEPT]
    for start, end in fetched:
        for k_start, k_end in kept:
            assert end <= k_start or start >= k_end, f"fetched {start}-{end} again; the old cache holds it"
    assert sum(end - start for start, end in fetched) == DATA_SIZE - sum(e - s for s, e in kept)


@pytest.mark.expect_log(r"chunk cache: .* failed its checksum or length")
def test_an_old_chunk_that_fails_its_trailer_is_refetched_never_served(
    pushed: dict[str, str], quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    cache = _old_cache(tmp_path / "cache")
    (chunk0,) = cache.glob("chunks/*-1048576/0")
    raw = bytearray(chunk0.read_bytes())
    raw[1000] ^= 0x01  # a flipped bit the trailer's checksum catches
    chunk0.write_bytes(bytes(raw))
    ref = pushed["mixed@"].replace(pushed["mixed@"].split("/", 1)[0], quirk_proxy.host, 1)
    files = tree_files("mixed")
    with mounted(ref, tmp_path / "mnt", "--timeout", "30", cache_dir=cache) as m:
        for rel, want in files.items():
            assert (m.path / os.fsdecode(rel)).read_bytes() == want.data, rel
    assert any(start < CHUNK for start, _end in _ranges(quirk_proxy)), "chunk 0 was fetched again"
