"""How the index costs grow with entries: open, lookup (hit/miss), listing a 10k directory, RSS.

Each measurement runs in a fresh subprocess so its peak RSS is honest. Paths are source-tree-like
(~60 bytes, names with '-', '.', '_' beside directories so walk order and byte order differ).
Targets (issue 2): open of 1M entries < 1 s; lookup < 50 us; RSS < index bytes + 100 MB.

    python -m bench.index_scale [--sizes 10000,100000,1000000] [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blobmount.index import EntryRecord, build_index

CACHE = Path(__file__).resolve().parent / ".cache"
BIG_DIR = b"src/drivers/net/ethernet/big-dir"  # holds 10k files in every generated index
BIG_DIR_FILES = 10_000
WORDS = ["core", "net", "fs", "mm", "util", "test", "driver", "block", "crypto", "sound", "arch", "lib"]


def make_paths(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    paths: set[bytes] = {BIG_DIR + b"/file_%05d.c" % i for i in range(min(BIG_DIR_FILES, n // 2))}
    dirs = [b"src"]
    while len(paths) < n:
        if rng.random() < 0.08 or len(dirs) < 50:
            parent = rng.choice(dirs)
            name = f"{rng.choice(WORDS)}{rng.choice(['', '-v2', '_x', '.d'])}{rng.randrange(100)}".encode()
            if len(parent) < 40:
                dirs.append(parent + b"/" + name)
        d = rng.choice(dirs)
        stem = f"{rng.choice(WORDS)}_{rng.randrange(10**6):06d}".encode()
        paths.add(d + b"/" + stem + rng.choice([b".c", b".h", b".py", b"-test.c", b".rs"]))
        if rng.random() < 0.02:
            paths.add(d + rng.choice([b"-extra.txt", b".md", b" notes"]))  # sorts between d and d/...
    return list(paths)


def build(n: int, order: str) -> Path:
    CACHE.mkdir(exist_ok=True)
    target = CACHE / f"index-{n}-{order}.blob"
    if target.exists():
        return target
    paths = make_paths(n)
    key = (lambda p: p.replace(b"/", b"\x00")) if order == "walk" else (lambda p: p)
    paths.sort(key=key)
    h = hashlib.sha256(b"x").digest()
    records = [EntryRecord(p, 0, 0, 0, h, 0o644, 1000, 1000, 1_700_000_000_000_000_000, 0) for p in paths]
    target.write_bytes(build_index(records, 0, h))
    return target


CHILD = r"""
import json, random, statistics, sys, time
from blobmount.index import IndexView
path, big_dir = sys.argv[1], sys.argv[2].encode()
buf = open(path, "rb").read()
t = time.perf_counter(); view = IndexView(buf, blob_size=0); open_s = time.perf_counter() - t
rng = random.Random(2)
hits = [view.path(rng.randrange(len(view))) for _ in range(2000)]
misses = [p + b"-missing" for p in hits]
def lat(fn, items):
    out = []
    for p in items:
        t = time.perf_counter(); fn(p); out.append(time.perf_counter() - t)
    out.sort()
    return statistics.median(out) * 1e6, out[int(len(out) * 0.99)] * 1e6
kind_hit = lat(view.kind, hits); kind_miss = lat(view.kind, misses)
find_hit = lat(view.find, hits)
t = time.perf_counter(); n = sum(1 for _ in view.children(big_dir)); list_s = time.perf_counter() - t
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would carry the parent's peak
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps(dict(entries=len(view), order=view.order.value, index_bytes=len(buf), open_s=open_s,
    kind_hit_us=kind_hit, kind_miss_us=kind_miss, find_hit_us=find_hit, list_entries=n, list_s=list_s,
    rss_bytes=rss)))
"""

BASELINE = r"""
import blobmount.index
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def measure(path: Path) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), BIG_DIR.decode()], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    base = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True).stdout)
    rows = []
    print(f"interpreter + blobmount.index baseline RSS: {base / 2**20:.1f} MiB")
    header = (
        f"{'entries':>9} {'order':>7} {'index MiB':>9} {'open s':>7} {'kind hit us':>15} {'kind miss us':>15}"
        f" {'list 10k s':>10} {'RSS MiB':>8} {'RSS-base-index MiB':>18}"
    )
    print(header)
    for n in sizes:
        for order in ("bytes", "walk"):
            started = time.perf_counter()
            path = build(n, order)
            built = time.perf_counter() - started
            r = measure(path)
            r["build_s"] = built
            rows.append(r)
            hit, miss = r["kind_hit_us"], r["kind_miss_us"]
            assert isinstance(hit, list)
            assert isinstance(miss, list)
            idx = int(r["index_bytes"])  # type: ignore[call-overload]
            rss = int(r["rss_bytes"])  # type: ignore[call-overload]
            print(
                f"{r['entries']:>9} {r['order']:>7} {idx / 2**20:>9.1f} {r['open_s']:>7.3f}"
                f" {hit[0]:>6.1f}/{hit[1]:>6.1f}p99 {miss[0]:>6.1f}/{miss[1]:>6.1f}p99"
                f" {r['list_s']:>10.3f} {rss / 2**20:>8.1f} {(rss - base - idx) / 2**20:>18.1f}"
            )
    print("targets: open(1M) < 1 s; lookup < 50 us; RSS < index bytes + 100 MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"baseline_rss": base, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    tempfile.tempdir = None
    sys.exit(main())
