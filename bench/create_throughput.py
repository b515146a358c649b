"""`blobmount create` throughput against `tar -cf` of the same tree, in the same run.

The tree (~1 GiB: a few large incompressible files and a few thousand small ones) is read once
first so both tools start from a warm page cache (a cold cache would measure the disk, not us);
each run writes a fresh path after `sync`. Neither tool fsyncs its output.
Target (issue 2): `create --compression none` within 2x of tar.

    python -m bench.create_throughput [--size-gib 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPS = 3


def make_tree(root: Path, total: int) -> int:
    rng = random.Random(4)
    block_bytes = 1 << 20
    written = 0
    small_total = total // 8
    (root / "small").mkdir(parents=True)
    i = 0
    while written < small_total:
        size = rng.randrange(1024, 64 << 10)
        d = root / "small" / f"d{i % 50:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}.txt").write_bytes(rng.randbytes(size // 4) * 4)
        written += size
        i += 1
    (root / "large").mkdir()
    n = 0
    while written < total:
        size = min(256 << 20, total - written)
        with open(root / "large" / f"big{n}.bin", "wb") as f:
            left = size
            while left:
                chunk = min(left, block_bytes)
                f.write(rng.randbytes(chunk))  # incompressible, like media or binaries
                left -= chunk
        written += size
        n += 1
    return written


def warm(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass


def timed(cmd: list[str], cleanup: Path) -> float:
    """Wall time of `cmd` writing to a fresh path, after `sync`: writeback left over from the
    previous run (or truncating a file still being written back) would otherwise land on whichever
    tool runs next."""
    if cleanup.exists():
        shutil.rmtree(cleanup) if cleanup.is_dir() else cleanup.unlink()
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    total = int(args.size_gib * (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="bench-create-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    try:
        if shutil.disk_usage(work).free < total * 4:
            raise SystemExit(f"need {total * 4 >> 30} GiB free in {work}")
        src = work / "src"
        size = make_tree(src, total)
        warm(src)
        blobmount = [sys.executable, "-m", "blobmount.cli"]
        runs = {
            "tar -cf": (["tar", "-cf", str(work / "out.tar"), "-C", str(src), "."], work / "out.tar"),
            "create none": ([*blobmount, "create", "--compression", "none", str(src), str(work / "a")], work / "a"),
            "create zstd": ([*blobmount, "create", str(src), str(work / "z")], work / "z"),
        }
        results: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(REPS):
            for name, (cmd, out) in runs.items():
                results[name].append(timed(cmd, out))
        print(f"tree: {size / 2**20:.0f} MiB, {sum(1 for _ in src.rglob('*') if _.is_file())} files (warm page cache)")
        print(f"{'tool':<12} {'min s':>7} {'median s':>9} {'MB/s (min)':>11} {'ratio to tar':>13}")
        tar_min = min(results["tar -cf"])
        for name, times in results.items():
            print(
                f"{name:<12} {min(times):>7.2f} {statistics.median(times):>9.2f}"
                f" {size / min(times) / 1e6:>11.0f} {min(times) / tar_min:>13.2f}"
            )
        print("target: create --compression none within 2x of tar (ratio <= 2.0)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"bytes": size, "seconds": results}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
