"""blobmount over a local archive against squashfuse over a squashfs image of the same data and
against plain files, in the same run (issue 3's figures).

Data: one 1 GiB incompressible file, and a tree of >= 20,000 real small files copied from this
machine (/usr/include, /usr/share/doc, /usr/lib/python3, /usr/share/perl, the venv's
site-packages; symlinks dropped, since archives hold regular files only). Cold runs drop the page
cache (`echo 3 > /proc/sys/vm/drop_caches`) and remount with an empty cache directory.

    python -m bench.fs_local [--quick] [--reps 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TREE_SOURCES = ["/usr/include", "/usr/share/doc", "/usr/lib/python3", "/usr/share/perl"]
MOUNT_WAIT_S = 60.0


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def make_data(work: Path, big_bytes: int, min_files: int) -> tuple[Path, Path]:
    big = work / "big"
    big.mkdir()
    with open(big / "big.bin", "wb") as f:
        left = big_bytes
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    tree = work / "tree"
    tree.mkdir()
    sources = [*TREE_SOURCES, str(Path(sys.executable).parent.parent / "lib")]
    for i, src in enumerate(sources):
        if os.path.isdir(src):
            subprocess.run(["cp", "-r", "--no-dereference", src, str(tree / f"s{i}")], check=False)
    sh(f"find {tree} -type l -delete; find {tree} ! -type f ! -type d -delete")
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    if len(files) > min_files:  # trim to the asked size (quick mode), keeping whole directories' order
        for p in files[min_files:]:
            p.unlink()
        files = files[:min_files]
    return big, tree


@contextlib.contextmanager
def mounted(kind: str, image: Path, mnt: Path, cache: Path) -> Iterator[int]:
    """Mount `image` with `kind` in the foreground; yield the daemon PID; always unmount."""
    mnt.mkdir(exist_ok=True)
    if kind == "plain":
        yield 0
        return
    shutil.rmtree(cache, ignore_errors=True)
    if kind == "blobmount":
        cmd = [sys.executable, "-m", "blobmount.cli", "mount", "-f", f"dir:{image}", str(mnt), "--cache-dir", str(cache)]
    else:
        cmd = ["squashfuse", "-f", str(image), str(mnt)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{kind} did not mount {image}")
            time.sleep(0.02)
        yield proc.pid
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def timed(cmd: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="64 MiB file, 2,000 files")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    big_bytes = (64 << 20) if args.quick else (1 << 30)
    min_files = 2000 if args.quick else 10**9
    work = Path(tempfile.mkdtemp(prefix="bench-fs-", dir="/var/tmp"))
    results: dict[str, dict[str, list[float]]] = {}
    rss: dict[str, int] = {}
    try:
        if shutil.disk_usage(work).free < 4 * big_bytes + (3 << 30):
            raise SystemExit("not enough free disk space")
        big, tree = make_data(work, big_bytes, min_files)
        nfiles = sum(1 for p in tree.rglob("*") if p.is_file())
        tree_bytes = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
        bm = [sys.executable, "-m", "blobmount.cli", "create"]
        subprocess.run([*bm, "--compression", "none", str(big), str(work / "a-big")], check=True, capture_output=True)
        subprocess.run([*bm, str(tree), str(work / "a-tree")], check=True, capture_output=True)
        subprocess.run([*bm, "--compression", "none", str(tree), str(work / "a-tree-raw")], check=True, capture_output=True)
        raw_sqfs = ["-noI", "-noD", "-noF", "-noX", "-noappend", "-quiet", "-no-progress"]
        sh(f"mksquashfs {big} {work / 'big.sqfs'} {' '.join(raw_sqfs)}")
        sh(f"mksquashfs {tree} {work / 'tree.sqfs'} -noappend -quiet -no-progress")
        sh(f"mksquashfs {tree} {work / 'tree-raw.sqfs'} {' '.join(raw_sqfs)}")
        configs: dict[str, tuple[str, Path, Path]] = {
            # name: (kind, big image, tree image)
            "plain": ("plain", big, tree),
            "squashfuse": ("squashfuse", work / "big.sqfs", work / "tree.sqfs"),
            "squashfuse-raw": ("squashfuse", work / "big.sqfs", work / "tree-raw.sqfs"),
            "blobmount": ("blobmount", work / "a-big", work / "a-tree"),
            "blobmount-raw": ("blobmount", work / "a-big", work / "a-tree-raw"),
        }
        mnt, cache = work / "mnt", work / "cache"

        def add(name: str, metric: str, value: float) -> None:
            results.setdefault(name, {}).setdefault(metric, []).append(value)

        def path_in(kind: str, image: Path, m: Path) -> Path:
            return image if kind == "plain" else m

        for rep in range(args.reps):
            for name, (kind, big_img, tree_img) in configs.items():
                if rep == 0 or not name.endswith("-raw"):
                    # sequential read of the big file: cold, then warm (kernel page cache)
                    with mounted(kind, big_img, mnt, cache) as pid:
                        target = path_in(kind, big_img, mnt) / "big.bin"
                        drop_caches()
                        add(name, "seq_cold_MBps", big_bytes / timed(f"cat {target}") / 1e6)
                        add(name, "seq_warm_MBps", big_bytes / timed(f"cat {target}") / 1e6)
                        if pid:
                            rss[name + "/big"] = max(rss.get(name + "/big", 0), vm_hwm(pid))
                for metric, cmd in (
                    ("find_s", "find {} -type f -printf '%s\\n'"),
                    ("readall_P8_s", "find {} -type f -print0 | xargs -0 -P8 cat"),
                    ("readall_P1_s", "find {} -type f -print0 | xargs -0 -P1 cat"),
                ):
                    with mounted(kind, tree_img, mnt, cache) as pid:
                        drop_caches()
                        add(name, metric, timed(cmd.format(path_in(kind, tree_img, mnt))))
                        if pid:
                            rss[name + "/tree"] = max(rss.get(name + "/tree", 0), vm_hwm(pid))
        summary = {n: {m: (min(v), statistics.median(v)) for m, v in ms.items()} for n, ms in results.items()}
        print(f"data: {big_bytes >> 20} MiB file; tree of {nfiles} files, {tree_bytes >> 20} MiB; {args.reps} reps")
        print(f"{'config':<15} {'seq cold MB/s':>14} {'seq warm MB/s':>14} {'find s':>8} {'read P8 s':>10} {'read P1 s':>10}")
        for name, ms in summary.items():
            cells = [
                f"{ms['seq_cold_MBps'][1]:>14.0f}",
                f"{ms['seq_warm_MBps'][1]:>14.0f}",
                f"{ms['find_s'][1]:>8.2f}",
                f"{ms['readall_P8_s'][1]:>10.2f}",
                f"{ms['readall_P1_s'][1]:>10.2f}",
            ]
            print(f"{name:<15} {' '.join(cells)}   (medians)")
        b, s, p = summary["blobmount"], summary["squashfuse"], summary["plain"]
        ratios: dict[str, float] = {
            "seq_cold_vs_squashfuse (>=0.8)": b["seq_cold_MBps"][1] / s["seq_cold_MBps"][1],
            "seq_warm_vs_plain (>=0.9)": b["seq_warm_MBps"][1] / p["seq_warm_MBps"][1],
            "find_time_vs_squashfuse (<=1.5)": b["find_s"][1] / s["find_s"][1],
            "readall_P8_time_vs_squashfuse": b["readall_P8_s"][1] / s["readall_P8_s"][1],
            "readall_P1_time_vs_squashfuse": b["readall_P1_s"][1] / s["readall_P1_s"][1],
        }
        for key, value in ratios.items():
            print(f"ratio {key}: {value:.2f}")
        for key, value in sorted(rss.items()):
            print(f"daemon peak RSS {key}: {value / 2**20:.1f} MiB")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            doc = {"files": nfiles, "tree_bytes": tree_bytes, "big_bytes": big_bytes, "results": results,
                   "ratios": ratios, "rss": rss}
            args.json.write_text(json.dumps(doc, indent=2))
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["fusermount3", "-u", "-z", str(work / "mnt")], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0




if __name__ == "__main__":
    sys.exit(main())
