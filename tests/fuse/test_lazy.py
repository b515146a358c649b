"""The lazy data path against a real docker-registry, counted at a proxy in front of it: only the
bytes read cross the network, in few requests, each chunk once per host; the cache survives
remounts, kills and full disks; verification state and mirrors behave as DESIGN §5 says."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blobmount.cache import CacheDir, ChunkStore
from blobmount.pieces import PIECE_BYTES
from tests.support.mounts import blobmount_cmd, mounted, unmount
from tests.support.servers import QuirkProxy, Registry
from tests.support.trust import (
    BIG,
    CHUNK,
    SMALL_BYTES,
    SMALL_FILES,
    LazyArchive,
    MiB,
    prefetch_small,
    push_lazy_archive,
    ranges,
)

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="session")
def lazy(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> LazyArchive:
    src, out = tmp_path_factory.mktemp("lazy-src"), tmp_path_factory.mktemp("lazy-archive")
    return push_lazy_archive(registry, "lazy/tree", src, out)


def fetched_bytes(quirk_proxy: QuirkProxy) -> int:
    return sum(b - a for a, b in ranges(quirk_proxy))


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def mount_args(*extra: str) -> tuple[str, ...]:
    return ("--timeout", "10", *extra)


def test_one_small_file_costs_at_most_two_chunks(lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path) -> None:
    with mounted(f"{quirk_proxy.host}/{lazy.repo}:v1", tmp_path / "mnt", *mount_args()) as m:
        quirk_proxy.state.seen.clear()
        assert read(m.path / "small/f0500.txt") == lazy.files["small/f0500.txt"]
        time.sleep(0.3)  # anything prefetched in the background would show up now
        assert len(ranges(quirk_proxy)) == 1  # no directory prefetch on a first read
        assert fetched_bytes(quirk_proxy) <= 2 * CHUNK
        assert not [p for _m, p, _h in quirk_proxy.state.seen if "/manifests/" in p]  # pinned at mount


def test_sequential_read_is_few_requests_each_byte_once(
    lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    with mounted(f"{quirk_proxy.host}/{lazy.repo}:v1", tmp_path / "mnt", *mount_args()) as m:
        quirk_proxy.state.seen.clear()
        assert read(m.path / "big.bin") == lazy.files["big.bin"]
        got = sorted(ranges(quirk_proxy))
    assert len(got) <= 16, got  # windows grow 1 -> 64 MiB; requests are capped at 8 MiB
    for (_a, b), (c, _d) in itertools.pairwise(got):
        assert b <= c, "a byte was fetched twice"
    assert fetched_bytes(quirk_proxy) <= BIG + 2 * CHUNK  # chunk alignment at both ends, nothing more


def test_small_files_read_in_order_prefetch_their_directory(
    lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    names = sorted(n for n in lazy.files if n.startswith("small/"))
    with mounted(f"{quirk_proxy.host}/{lazy.repo}:v1", tmp_path / "mnt", *mount_args()) as m:
        quirk_proxy.state.seen.clear()
        for name in names:
            assert read(m.path / name) == lazy.files[name]
        chunks = SMALL_FILES * SMALL_BYTES // CHUNK
        assert len(ranges(quirk_proxy)) < chunks // 2, ranges(quirk_proxy)  # one request per chunk without prefetch
        assert fetched_bytes(quirk_proxy) <= SMALL_FILES * SMALL_BYTES + 2 * CHUNK


def test_random_reads_fetch_a_piece_each_and_no_read_ahead(
    lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    offsets = [i * 2 * MiB + 1000 for i in range(11)]
    random.Random(3).shuffle(offsets)
    with mounted(f"{quirk_proxy.host}/{lazy.repo}:v1", tmp_path / "mnt", *mount_args()) as m:
        quirk_proxy.state.seen.clear()
        with open(m.path / "big.bin", "rb") as f:
            for off in offsets:
                assert os.pread(f.fileno(), 4096, off) == lazy.files["big.bin"][off : off + 4096]
        time.sleep(0.3)
        got = ranges(quirk_proxy)
    assert len(got) == len(offsets), got
    # 32 KiB pieces (two where a read straddles them), not 1 MiB chunks: blobmount/pieces.py
    assert all(b - a <= 2 * PIECE_BYTES for a, b in got), got


def test_two_daemons_sharing_a_cache_fetch_each_chunk_once(
    lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    cache = tmp_path / "shared-cache"
    src = f"{quirk_proxy.host}/{lazy.repo}@{lazy.digest}"
    with (
        mounted(src, tmp_path / "a", *mount_args(), cache_dir=cache) as a,
        mounted(src, tmp_path / "b", *mount_args(), cache_dir=cache) as b,
    ):
        quirk_proxy.state.seen.clear()
        results: dict[str, bytes] = {}

        def reader(m: Path, key: str) -> None:
            results[key] = read(m / "big.bin")

        threads = [threading.Thread(target=reader, args=(m.path, str(m.path))) for m in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(v == lazy.files["big.bin"] for v in results.values())
        assert len(results) == 2
    covered: list[int] = []
    for a0, b0 in ranges(quirk_proxy):
        covered.extend(range(a0 // CHUNK, (b0 - 1) // CHUNK + 1))
    assert len(covered) == len(set(covered)), "a chunk was fetched by both daemons"


def test_warm_remounts_by_digest_and_by_tag(lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with mounted(f"{quirk_proxy.host}/{lazy.repo}:v1", tmp_path / "m1", *mount_args(), cache_dir=cache) as m:
        assert read(m.path / "other/blob.bin") == lazy.files["other/blob.bin"]
    quirk_proxy.state.seen.clear()
    with mounted(f"{quirk_proxy.host}/{lazy.repo}@{lazy.digest}", tmp_path / "m2", *mount_args(), cache_dir=cache) as m:
        assert read(m.path / "other/blob.bin") == lazy.files["other/blob.bin"]
    assert quirk_proxy.state.seen == []  # a digest remount of cached data makes no request at all
    with mounted(f"{quirk_proxy.host}/{lazy.repo}:v1", tmp_path / "m3", *mount_args(), cache_dir=cache) as m:
        assert read(m.path / "other/blob.bin") == lazy.files["other/blob.bin"]
    assert [(meth, "/manifests/" in p) for meth, p, _h in quirk_proxy.state.seen] == [("HEAD", True)]


def test_prefetch_then_offline_with_the_registry_gone(
    lazy: LazyArchive, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    ref = f"{quirk_proxy.host}/{lazy.repo}:v1"
    assert f"{SMALL_FILES * SMALL_BYTES} bytes in the cache" in prefetch_small(ref, cache)
    requests = len(ranges(quirk_proxy))
    assert requests <= 2  # the whole directory is one contiguous range
    quirk_proxy.stop()  # the registry is unreachable from here on
    with mounted(ref, tmp_path / "mnt", "--offline", *mount_args(), cache_dir=cache) as m:
        for i in range(0, SMALL_FILES, 97):
            name = f"small/f{i:04}.txt"
            assert read(m.path / name) == lazy.files[name]
        with pytest.raises(OSError) as err:
            read(m.path / "big.bin")
        assert err.value.errno == 5
        assert "--offline" in m.log()


def test_verified_state_survives_a_remount(lazy: LazyArchive, registry: Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"
    with mounted(src, tmp_path / "m1", *mount_args(), cache_dir=cache) as m:
        assert read(m.path / "big.bin") == lazy.files["big.bin"]
        assert os.getxattr(m.path / "big.bin", "user.blobmount.verified") == b"verified"
    with mounted(src, tmp_path / "m2", *mount_args(), cache_dir=cache) as m, open(m.path / "big.bin", "rb") as f:
        assert f.read(1) == lazy.files["big.bin"][:1]
        assert os.getxattr(m.path / "big.bin", "user.blobmount.verified") == b"verified"  # no re-hash
    with (
        mounted(src, tmp_path / "m3", *mount_args(), cache_dir=tmp_path / "cold") as m,
        open(m.path / "big.bin", "rb") as f,
    ):
        assert f.read(1) == lazy.files["big.bin"][:1]
        assert os.getxattr(m.path / "big.bin", "user.blobmount.verified") == b"unverified"  # the control


def test_background_verification_completes_without_the_reader(
    lazy: LazyArchive, registry: Registry, tmp_path: Path
) -> None:
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"
    with (
        mounted(src, tmp_path / "mnt", "--verify", "background", *mount_args()) as m,
        open(m.path / "big.bin", "rb") as f,
    ):
        assert f.read(10) == lazy.files["big.bin"][:10]
        deadline = time.monotonic() + 60
        while os.getxattr(m.path / "big.bin", "user.blobmount.verified") != b"verified":
            assert time.monotonic() < deadline, "background verification never finished"
            time.sleep(0.1)


def test_a_corrupting_mirror_is_overruled_by_the_origin(
    lazy: LazyArchive, registry: Registry, quirk_proxy: QuirkProxy, tmp_path: Path
) -> None:
    quirk_proxy.state.corrupt_ranges = True  # the proxy is a mirror that flips a byte of every range
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"
    with mounted(src, tmp_path / "mnt", "--mirror", quirk_proxy.host, *mount_args()) as m:
        read(m.path / "other/blob.bin")  # lazily served as it comes: the mirror's bytes
        time.sleep(1)  # the mismatch drops the pages and refetches from the origin
        assert os.getxattr(m.path / "other/blob.bin", "user.blobmount.verified") == b"verified"
        assert read(m.path / "other/blob.bin") == lazy.files["other/blob.bin"]
        assert "reading it again" in m.log()
        assert "poison" not in m.log()
        assert "ERROR" not in m.log()
        # small files are verified before a byte is served: the mirror's bytes never reach a reader
        assert read(m.path / "small/f0001.txt") == lazy.files["small/f0001.txt"]


def test_a_tiny_cache_stays_within_its_limit(lazy: LazyArchive, registry: Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"
    with mounted(src, tmp_path / "mnt", "--cache-size", "3M", *mount_args(), cache_dir=cache) as m:
        assert read(m.path / "big.bin") == lazy.files["big.bin"]
        time.sleep(0.3)
        stored = sum(f.stat().st_size for d in ("chunks", "content") for f in (cache / d).rglob("*") if f.is_file())
        assert stored <= 3 * MiB


def _chunk_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "chunks").rglob("*") if p.is_file() and not p.name.endswith(".tmp")]


def test_kill_9_during_fills_leaves_no_torn_chunk_and_flips_are_caught(
    lazy: LazyArchive, registry: Registry, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"
    with mounted(src, tmp_path / "m1", *mount_args(), cache_dir=cache) as m:

        def reader() -> None:
            with contextlib.suppress(OSError):  # the daemon dies under it
                read(m.path / "big.bin")

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while len(_chunk_files(cache)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(10)
        t.join(10)
    unmount(tmp_path / "m1")
    files = _chunk_files(cache)
    assert files
    # every chunk file on disk is whole: its length and checksum hold
    c = CacheDir(cache)
    store = ChunkStore(c, files[0].parent.name.rsplit("-", 1)[0], lazy.data_size, CHUNK)
    for f in files:
        assert store.load(int(f.name)) is not None, f"torn chunk {f}"
    victim = files[0]
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0x01
    victim.write_bytes(bytes(raw))
    with mounted(src, tmp_path / "m2", *mount_args(), cache_dir=cache) as m:
        assert read(m.path / "big.bin") == lazy.files["big.bin"]
        assert "failed its checksum" in m.log()


def test_a_full_cache_disk_and_a_deleted_cache_dir_keep_reads_working(
    lazy: LazyArchive, registry: Registry, tmp_path: Path
) -> None:
    tiny = tmp_path / "tiny"
    tiny.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(tiny)], check=True, timeout=30)
    try:
        src = f"{registry.host}/{lazy.repo}@{lazy.digest}"
        with mounted(src, tmp_path / "m1", *mount_args(), cache_dir=tiny / "cache") as m:
            assert read(m.path / "big.bin") == lazy.files["big.bin"]
            assert read(m.path / "other/blob.bin") == lazy.files["other/blob.bin"]
            assert "serving from memory" in m.log()
    finally:
        subprocess.run(["umount", str(tiny)], check=False, timeout=30)
    cache = tmp_path / "cache"
    with mounted(src, tmp_path / "m2", *mount_args(), cache_dir=cache) as m:
        assert read(m.path / "small/f0000.txt") == lazy.files["small/f0000.txt"]
        for _ in range(20):  # the daemon may be writing into it while it goes
            subprocess.run(["rm", "-rf", str(cache)], check=False, timeout=30)
            if not cache.exists():
                break
        assert read(m.path / "big.bin") == lazy.files["big.bin"]
        names = [f"small/f{i:04}.txt" for i in range(500, 520)]
        assert all(read(m.path / n) == lazy.files[n] for n in names)


def test_cache_status_and_prune_on_a_live_cache(lazy: LazyArchive, registry: Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = f"{registry.host}/{lazy.repo}@{lazy.digest}"
    with mounted(src, tmp_path / "mnt", *mount_args(), cache_dir=cache) as m:
        assert read(m.path / "other/blob.bin") == lazy.files["other/blob.bin"]
        time.sleep(0.3)
        status = subprocess.run(
            blobmount_cmd("cache", "status", "--cache-dir", str(cache)), capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0, status.stderr
        assert "chunks" in status.stdout
        held = int(status.stdout.split(": ", 1)[1].split(" bytes")[0])
        assert held >= 4 * MiB
        pruned = subprocess.run(
            blobmount_cmd("cache", "prune", "--cache-dir", str(cache), "--size", "0"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert pruned.returncode == 0, pruned.stderr
        assert not _chunk_files(cache)
        assert read(m.path / "small/f0002.txt") == lazy.files["small/f0002.txt"]  # refetched
