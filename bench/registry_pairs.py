"""``python -m bench.registry_pairs BEFORE_TREE AFTER_TREE [--pairs N]``: the quick before/after
subset for a change below the HTTP line, interleaved (before, after, after, before, ...) so that
load on a shared machine falls on both alike.

One registry on 127.0.0.1 serves one archive (a 256 MiB random file and a tree of 1000 small
files). Each trial mounts it with a fresh cache, using the blobmount source tree given
(``PYTHONPATH``), and measures: a cold sequential read of the big file (wall MB/s and the
daemon's CPU-s/GiB from /proc: utime+stime, the figure load disturbs least), then reading the
whole tree (wall s). Prints one line per trial, then per side the median and the spread
(min-max), and the after/before ratios of the medians.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIG_BYTES = 256 << 20
SMALL_FILES = 1000
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def make_tree(root: Path) -> None:
    rng = random.Random(7)
    (root / "tree").mkdir(parents=True)
    with open(root / "big.bin", "wb") as f:
        for _ in range(BIG_BYTES >> 20):
            f.write(rng.randbytes(1 << 20))
    for i in range(SMALL_FILES):
        d = root / "tree" / f"d{i % 20:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:04d}.txt").write_bytes(rng.randbytes(rng.randint(1 << 10, 32 << 10)))


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def trial(tree: Path, ref: str, work: Path, n: int) -> dict[str, float]:
    mnt, cache = work / f"mnt{n}", work / f"cache{n}"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "blobmount.cli", "mount", "-f", ref, str(mnt), "--cache-dir", str(cache)]
    # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH: run from
    # a checkout's root, both sides would import that checkout
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = proc.stderr.read().decode()[-500:] if proc.stderr else ""
                raise RuntimeError(f"mount did not come up: {why}")
            time.sleep(0.05)
        c0, t0 = cpu_s(proc.pid), time.perf_counter()
        with open(mnt / "big.bin", "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        t1, c1 = time.perf_counter(), cpu_s(proc.pid)
        for dirpath, _, names in os.walk(mnt / "tree"):
            for name in names:
                Path(dirpath, name).read_bytes()
        t2 = time.perf_counter()
        gib = BIG_BYTES / (1 << 30)
        return {"seq_mb_s": BIG_BYTES / 1e6 / (t1 - t0), "seq_cpu_s_gib": (c1 - c0) / gib, "tree_s": t2 - t1}
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--pairs", type=int, default=3)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.servers import start_registry

    with tempfile.TemporaryDirectory(prefix="bench-pairs-") as tmp:
        work = Path(tmp)
        make_tree(work / "src")
        reg = start_registry(work / "registry")
        try:
            ref = f"{reg.host}/bench/pairs:v1"
            subprocess.run([sys.executable, "-m", "blobmount.cli", "push", str(work / "src"), ref], check=True)
            results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            n = 0
            for i in range(args.pairs):
                for side in ("before", "after") if i % 2 == 0 else ("after", "before"):
                    n += 1
                    r = trial(getattr(args, side), ref, work, n)
                    results[side].append(r)
                    print(f"pair {i + 1} {side:6s} " + " ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
        finally:
            reg.stop()
    for key in ("seq_mb_s", "seq_cpu_s_gib", "tree_s"):
        med = {s: statistics.median(r[key] for r in results[s]) for s in results}
        spread = {s: (min(r[key] for r in results[s]), max(r[key] for r in results[s])) for s in results}
        print(
            f"{key}: before {med['before']:.3f} [{spread['before'][0]:.3f}-{spread['before'][1]:.3f}]"
            f"  after {med['after']:.3f} [{spread['after'][0]:.3f}-{spread['after'][1]:.3f}]"
            f"  after/before {med['after'] / med['before']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
