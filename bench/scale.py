"""How a mounted archive's costs grow with its entries (bench.index_scale does the same without FUSE).

Archives of 10k, 100k and 1M entries with index_scale's source-tree-like paths (one directory of
10,000 files among them), and one archive whose 100,000 entries all sit in one directory. Entries
are empty files (the index is what is measured; the data blob is empty), cached in bench/.cache.
Each is mounted by ``blobmount mount -f`` from a local directory (so "mount-ready" is the cost
after the index is local) with the page cache dropped first, then, in this order:
- lookups: ``os.stat`` of 2,000 random file paths (each a first lookup in this mount; median, p99);
  then the same paths again (warm: the kernel's dentry cache);
- readdir: one listing of the big directory;
- ``find MNT -type f -printf '%s\\n'``, output counted;
- the daemon's peak RSS (VmHWM), beside the index size;
then unmounted and mounted again over the same cache directory, page cache dropped: mount-ready
once the index's order record is cached (what a remount, or any mount of an index seen before, costs).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import index_scale, workloads
from bench._common import drop_caches, percentile
from bench.datasets import CACHE, Dataset
from bench.peers import Mounter, Peer

SIZES_FULL = (10_000, 100_000, 1_000_000)
SIZES_QUICK = (10_000,)
FLAT_FULL = 100_000
FLAT_QUICK = 10_000
FLAT_DIR = b"flat"
LOOKUPS = 2_000
SCALE_MTIME_NS = 1_700_000_000_000_000_000


def _build_child(kind: str, n: int, out: str) -> None:
    """Write index.blob + an empty data.blob for `n` empty files into `out` (in a child process)."""
    from blobmount.index import EntryRecord, build_index  # children only: the parent stays small

    paths = index_scale.make_paths(n) if kind == "tree" else [FLAT_DIR + b"/f%07d" % i for i in range(n)]
    empty = hashlib.sha256(b"").digest()
    records = [EntryRecord(p, 0, 0, 0, empty, 0o644, 0, 0, SCALE_MTIME_NS, 0) for p in paths]
    index = build_index(records, 0, empty)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "data.blob").write_bytes(b"")
    (dest / "index.blob.tmp").write_bytes(index)
    (dest / "index.blob.tmp").replace(dest / "index.blob")
    (dest / "paths.txt").write_bytes(b"\n".join(paths) + b"\n")


def ensure_archive(kind: str, n: int) -> Path:
    key = hashlib.sha256((index_scale.cache_key() + Path(__file__).read_text()).encode()).hexdigest()[:12]
    dest = CACHE / "scale" / f"{kind}-{n}-{key}"
    if not (dest / "index.blob").exists():
        for stale in (CACHE / "scale").glob(f"{kind}-{n}-*"):
            subprocess.run(["rm", "-rf", str(stale)], check=True)
        print(f"building a {n:,}-entry {kind} archive for the scale runs (cached afterwards)", flush=True)
        subprocess.run([sys.executable, "-m", "bench.scale", "_build", kind, str(n), str(dest)], check=True)
    return dest


def measure(mounter: Mounter, kind: str, n: int, reps: int, timeout_s: float) -> dict[str, Any]:
    arc = ensure_archive(kind, n)
    paths = (arc / "paths.txt").read_text(errors="surrogateescape").splitlines()
    rng = random.Random(n)
    sample = [rng.choice(paths) for _ in range(LOOKUPS)]
    listfile = mounter.work / f"lookups-{kind}-{n}.txt"
    listfile.write_text("\n".join(sample) + "\n", errors="surrogateescape")
    big_dir = FLAT_DIR.decode() if kind == "flat" else index_scale.BIG_DIR.decode()
    peer = Peer("blobmount-dir", "blobmount-dir", "local")
    ds = Dataset(f"scale-{kind}-{n}", arc, arc, arc, arc, n, 0, "", f"synthetic {kind}")
    rows: list[dict[str, Any]] = []
    for _ in range(reps):
        drop_caches()
        with mounter.mount(peer, ds) as m:
            cold = workloads.probe(["stat", str(m.root), str(listfile)], timeout_s)
            warm = workloads.probe(["stat", str(m.root), str(listfile)], timeout_s)
            listing = workloads.probe(["listdir", str(m.root / big_dir)], timeout_s)
            t = time.perf_counter()
            _, out = workloads.run_child([f"find {m.root} -type f -printf '%s\\n'"], timeout_s, shell=True)
            find_s = time.perf_counter() - t
            found = len(out.splitlines())
            rows.append(
                {
                    "ready_s": m.ready_s,
                    "lookup_cold_us": _lat(cold),
                    "lookup_warm_us": _lat(warm),
                    "readdir_s": listing["seconds"],
                    "readdir_entries": listing["entries"],
                    "find_s": find_s,
                    "find_files": found,
                    "rss_bytes": m.peak_rss(),
                }
            )
        drop_caches()
        with mounter.mount(peer, ds, fresh_cache=False) as m:  # the index's order record is cached now
            rows[-1]["ready_remount_s"] = m.ready_s
        if found != n or cold["missing"]:
            raise RuntimeError(f"scale {kind} {n}: find saw {found} files, {cold['missing']} lookups missed")
    return {"kind": kind, "entries": n, "index_bytes": (arc / "index.blob").stat().st_size, "reps": rows}


def first_stats(mounter: Mounter, kind: str, n: int, timeout_s: float) -> dict[str, Any]:
    """One fresh mount, page cache dropped: mount-ready, the first stat of the big directory (its
    whole listing is read then: nlink and the directory's time), then the first lookups of the
    same LOOKUPS random paths :func:`measure` uses. The part of a scale run that directory
    attributes can change, without the minute of find(1) over a million entries."""
    arc = ensure_archive(kind, n)
    paths = (arc / "paths.txt").read_text(errors="surrogateescape").splitlines()
    rng = random.Random(n)
    sample = [rng.choice(paths) for _ in range(LOOKUPS)]
    listfile = mounter.work / f"lookups-{kind}-{n}.txt"
    listfile.write_text("\n".join(sample) + "\n", errors="surrogateescape")
    big_dir = FLAT_DIR.decode() if kind == "flat" else index_scale.BIG_DIR.decode()
    bigfile = mounter.work / f"bigdir-{kind}-{n}.txt"
    bigfile.write_text(big_dir + "\n")
    peer = Peer("blobmount-dir", "blobmount-dir", "local")
    ds = Dataset(f"scale-{kind}-{n}", arc, arc, arc, arc, n, 0, "", f"synthetic {kind}")
    drop_caches()
    with mounter.mount(peer, ds) as m:
        assert m.pid is not None
        cpu = [_cpu_s(m.pid)]
        big = workloads.probe(["stat", str(m.root), str(bigfile)], timeout_s)
        cpu.append(_cpu_s(m.pid))
        cold = workloads.probe(["stat", str(m.root), str(listfile)], timeout_s)
        cpu.append(_cpu_s(m.pid))
        st = (m.root / big_dir).stat()
    big_us = big["latencies_us"]
    if cold["missing"] or big["missing"] or not isinstance(big_us, list):
        raise RuntimeError(f"first-stat {kind} {n}: {cold['missing']} lookups missed")
    return {
        "kind": kind,
        "entries": n,
        "ready_s": m.ready_s,
        "big_dir": big_dir,
        "big_dir_first_stat_us": big_us[0],
        "big_dir_mtime_ns": st.st_mtime_ns,
        "lookup_cold_us": _lat(cold),
        # the daemon's CPU (all threads, 10 ms ticks): to mount-ready, for the big directory's
        # first stat, for the first lookups; steadier than wall time on a loaded machine
        "daemon_cpu_s": {"ready": cpu[0], "big_dir": cpu[1] - cpu[0], "lookups": cpu[2] - cpu[1]},
    }


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _first_stat_main(argv: list[str]) -> int:
    """``python -m bench.scale first-stat KIND N [REPS]``: :func:`first_stats` REPS times, one JSON
    line each. The daemon is the ``blobmount`` of the interpreter running this, so two checkouts'
    daemons can be compared in one session with the same bench code (run it with each venv's
    python from this checkout). Work files under $BENCH_WORK_ROOT/first-stat."""
    import fcntl

    from bench.janitor import WORK_ROOT, Janitor, fresh_dir

    kind, n, reps = argv[0], int(argv[1]), int(argv[2]) if len(argv) > 2 else 1
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    lock = os.open(WORK_ROOT.with_name(WORK_ROOT.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)  # the suite's
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"a benchmark run holds the lock of {WORK_ROOT}; set BENCH_WORK_ROOT") from None
    janitor = Janitor(WORK_ROOT)
    try:
        for line in janitor.recover(None):
            print(f"recovered: {line}", file=sys.stderr)
        work = fresh_dir(WORK_ROOT / "first-stat")
        mounter = Mounter(janitor, work)
        for _ in range(reps):
            print(json.dumps(first_stats(mounter, kind, n, 300.0)), flush=True)
    finally:
        janitor.stop_all()
        os.close(lock)
    return 0


def _lat(r: dict[str, Any]) -> dict[str, float]:
    lat = sorted(r["latencies_us"])
    return {"median": lat[len(lat) // 2], "p99": percentile(lat, 0.99)}


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_build":
        _build_child(argv[1], int(argv[2]), argv[3])
        return 0
    if argv and argv[0] == "first-stat":
        return _first_stat_main(argv[1:])
    raise SystemExit("bench.scale is run by `python -m bench` (the suite)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
