"""blobmount over a local archive against squashfuse over a squashfs image of the same data and
against the plain files, all measured in the same run (issue 3's figures).

Data, built fresh in a temporary directory on the same disk for every peer:
- one file of os.urandom blocks (1 GiB; 64 MiB with --quick): archived with ``--compression none``;
  squashfs both uncompressed (``-noI -noD -noF -noX``) and ``-comp zstd``;
- a tree of >= 20,000 real files nobody here wrote (this Python's stdlib, /usr/include,
  /usr/share/doc, /usr/lib/python3, /usr/share/perl, more if short; ~2,000 with --quick), regular
  files only: archived with the default (zstd) and with none; squashfs with mksquashfs' defaults
  (gzip), with ``-comp zstd`` and uncompressed.

Workloads, each repeated (3 by default; configurations interleaved within a repetition so drift hits
them alike), reported as min and median:
- sequential read of the big file, cold: a fresh mount with an empty cache directory after
  ``sync; echo 3 > /proc/sys/vm/drop_caches``, so every peer (plain files too) reads from the disk;
  then a re-read in the same mount (warm: the kernel's page cache);
- ``find MNT -type f -printf '%s\\n'``, cold (fresh mount, dropped caches), then again warm; its output
  is summed and checked against the tree;
- read every file, ``find -print0 | xargs -0 -P8 cat`` (cold, then warm in the same mount) and ``-P1``
  (cold);
- the daemon's peak RSS (VmHWM), and its read syscalls per MiB during the cold sequential read (one
  read of /dev/fuse plus one pread per FUSE request: a proxy for the kernel's request size).

    python -m bench.fs_local [--quick] [--reps N] [--json [OUT]]

Needs root (drop_caches), squashfuse, mksquashfs and fusermount3. Every mount is unmounted and every
daemon stopped by PID at the end, failure or not; the temporary data is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

REPS = 3
BIG_BYTES_FULL = 1 << 30
BIG_BYTES_QUICK = 64 << 20
TREE_MIN_FILES_FULL = 20_000  # the floor for the small-file tree
TREE_MAX_FILES_FULL = 30_000  # enough to dominate per-mount costs; bounds the copy
TREE_FILES_QUICK = 2_000
TREE_EXTRA_SOURCES = ("/usr/include", "/usr/share/doc", "/usr/lib/python3", "/usr/share/perl")
TREE_FALLBACK_SOURCES = (sysconfig.get_paths()["purelib"], "/usr/share", "/usr/lib")
URANDOM_BLOCK_BYTES = 8 << 20
READ_BUF_BYTES = 1 << 20  # application read size for the sequential read (cat uses 128 KiB)
DISK_MARGIN_BYTES = 1 << 30
MOUNT_TIMEOUT_S = 60.0  # a mount answers in well under a second; a minute means it is broken
STOP_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 1800.0  # one workload run; a hang fails the bench instead of blocking forever
MKSQUASHFS_NONE = ("-noI", "-noD", "-noF", "-noX")
MKSQUASHFS_COMMON = ("-noappend", "-quiet", "-no-progress")

SEQ_METRICS = ("seq_cold_s", "seq_warm_s")
TREE_METRICS = ("find_cold_s", "find_warm_s", "readall_p8_cold_s", "readall_p8_warm_s", "readall_p1_cold_s")


@dataclass(frozen=True, slots=True)
class Peer:
    """One way to present a data set: ``kind`` is plain/blobmount/squashfuse; ``image`` the plain
    directory, the archive directory or the squashfs image."""

    name: str
    kind: str
    image: Path


class Bench:
    """Holds the work directory, the live daemons and the results of one run."""

    def __init__(self, work: Path, deadline: float) -> None:
        self.work = work
        self.mnt = work / "mnt"
        self.cache = work / "cache"
        self.logs = work / "logs"
        self.deadline = deadline
        self.live: dict[int, subprocess.Popen[bytes]] = {}
        self.results: dict[str, dict[str, list[float]]] = {}
        self.rss: dict[str, int] = {}
        self.syscr_per_mib: dict[str, list[float]] = {}
        self.read_ahead_kb: dict[str, int] = {}
        self.mounts = 0
        self.mnt.mkdir()
        self.logs.mkdir()

    def add(self, peer: str, metric: str, value: float) -> None:
        self.results.setdefault(peer, {}).setdefault(metric, []).append(value)

    def remaining_s(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the benchmark ran past its overall time limit")
        return left

    @contextlib.contextmanager
    def mounted(self, peer: Peer) -> Iterator[tuple[Path, int | None]]:
        """Yield (root to read, daemon PID or None for plain files); a fresh mount with an empty
        cache directory each time. Unmounts and stops the daemon on the way out, whatever happened."""
        if peer.kind == "plain":
            yield peer.image, None
            return
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir()
        if peer.kind == "blobmount":
            cmd = [sys.executable, "-m", "blobmount.cli", "mount", "-f", str(peer.image), str(self.mnt)]
            cmd += ["--cache-dir", str(self.cache)]
        else:
            cmd = ["squashfuse", "-f", str(peer.image), str(self.mnt)]
        self.mounts += 1
        log_path = self.logs / f"{self.mounts:04d}-{peer.name}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        self.live[proc.pid] = proc
        try:
            deadline = time.monotonic() + MOUNT_TIMEOUT_S
            while not os.path.ismount(self.mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{peer.name}: {shlex.join(cmd)} did not mount:\n{tail}")
                time.sleep(0.01)
            os.stat(self.mnt)  # the first request reaches the daemon, not the mount syscall
            with contextlib.suppress(OSError, ValueError):
                dev = os.stat(self.mnt).st_dev
                bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
                self.read_ahead_kb[peer.name] = int(bdi.read_text())
            yield self.mnt, proc.pid
        finally:
            self.stop(proc)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Unmount (the daemon then exits by itself); escalate to SIGTERM, then SIGKILL, by PID."""
        if os.path.ismount(self.mnt):
            done = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True, timeout=60, check=False)
            if done.returncode != 0:  # busy (a killed reader still holds it): detach it
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, timeout=60, check=False)
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT_S)
                break
            except subprocess.TimeoutExpired:
                continue
        self.live.pop(proc.pid, None)

    def stop_all(self) -> None:
        for proc in list(self.live.values()):
            with contextlib.suppress(Exception):
                self.stop(proc)
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, timeout=60, check=False)


# -- helpers -------------------------------------------------------------------------------------


def drop_caches() -> None:
    subprocess.run(["sync"], check=True, timeout=600)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def proc_field(pid: int, name: str, key: str) -> int:
    """A number from /proc/PID/status (kB, returned in bytes) or /proc/PID/io."""
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(key + ":"):
            value = int(line.split()[1])
            return value * 1024 if name == "status" else value
    raise RuntimeError(f"/proc/{pid}/{name} has no {key}")


def shell(cmd: str, timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], check=True, capture_output=True, timeout=min(timeout_s, RUN_TIMEOUT_S)
    )


def run_quiet(cmd: list[str], timeout_s: float = RUN_TIMEOUT_S) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr.decode(errors='replace')}")
    return time.perf_counter() - t


def read_file(path: Path, expected: int, timeout_s: float) -> float:
    """Seconds to read `path` start to end with READ_BUF_BYTES reads; checks the length."""
    buf = bytearray(READ_BUF_BYTES)
    view = memoryview(buf)
    total = 0
    limit = expected // READ_BUF_BYTES + 2
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        for _ in range(limit):
            n = f.readinto(view)
            if not n:
                break
            total += n
            if time.perf_counter() - t > timeout_s:
                raise TimeoutError(f"reading {path} took over {timeout_s:.0f} s")
    elapsed = time.perf_counter() - t
    if total != expected:
        raise RuntimeError(f"{path}: read {total} bytes, expected {expected}")
    return elapsed


def make_big(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // URANDOM_BLOCK_BYTES):
            f.write(os.urandom(URANDOM_BLOCK_BYTES))
        f.write(os.urandom(size % URANDOM_BLOCK_BYTES))


def make_tree(root: Path, min_files: int, max_files: int) -> tuple[int, int]:
    """Copy regular files (no symlinks, devices, sockets) from this machine's source trees into
    `root`, one sub-directory per source, until `max_files`. Returns (files, bytes)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = [stdlib, *TREE_EXTRA_SOURCES, *TREE_FALLBACK_SOURCES]
    files = size = 0
    for i, src in enumerate(sources):
        if files >= max_files or (files >= min_files and i > len(TREE_EXTRA_SOURCES)):
            break  # the fallbacks only fill up to the floor
        if not os.path.isdir(src):
            continue
        dest_root = root / f"{i}-{Path(src).name}"
        for dirpath, dirnames, filenames in os.walk(src):  # never follows symlinks
            if dirpath == stdlib:
                dirnames[:] = [d for d in dirnames if d != "site-packages"]
            dirnames.sort()
            for name in sorted(filenames):
                if files >= max_files:
                    break
                src_path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(src_path)
                    if not stat.S_ISREG(st.st_mode):  # regular files only
                        continue
                    dest = dest_root / os.path.relpath(src_path, src)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src_path, dest, follow_symlinks=False)
                except OSError:
                    continue  # unreadable or vanished: not ours to worry about
                files += 1
                size += st.st_size
            if files >= max_files:
                break
    if files < min_files:
        raise SystemExit(f"found only {files} regular files to copy; need {min_files}")
    return files, size


def machine() -> tuple[dict[str, object], str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024

    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
        except OSError:
            return "?"
        text = (out.stdout or out.stderr).decode(errors="replace").strip().splitlines()
        return text[0] if text else "?"

    info: dict[str, object] = {
        "nproc": os.cpu_count(),
        "memory_bytes": mem,
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "squashfuse": version(["squashfuse", "-V"]),
        "mksquashfs": version(["mksquashfs", "-version"]),
        "blobmount": version([sys.executable, "-m", "blobmount.cli", "--version"]),
    }
    line = (
        f"machine: {cpu}, nproc {os.cpu_count()}, {mem / 2**30:.1f} GiB RAM, kernel {platform.release()};"
        f" {info['squashfuse']}; {info['mksquashfs']}; {info['blobmount']}"
    )
    return info, line


# -- workloads -----------------------------------------------------------------------------------


def bench_big(b: Bench, peer: Peer, big_bytes: int) -> None:
    with b.mounted(peer) as (root, pid):
        drop_caches()
        syscr = proc_field(pid, "io", "syscr") if pid else 0
        b.add(peer.name, "seq_cold_s", read_file(root / "big.bin", big_bytes, b.remaining_s()))
        if pid:
            per_mib = (proc_field(pid, "io", "syscr") - syscr) / (big_bytes / 2**20)
            b.syscr_per_mib.setdefault(peer.name, []).append(per_mib)
        b.add(peer.name, "seq_warm_s", read_file(root / "big.bin", big_bytes, b.remaining_s()))
        if pid:
            b.rss[peer.name + "/big"] = max(b.rss.get(peer.name + "/big", 0), proc_field(pid, "status", "VmHWM"))


def bench_tree(b: Bench, peer: Peer, files: int, tree_bytes: int) -> None:
    def note_rss(pid: int | None) -> None:
        if pid:
            key = peer.name + "/tree"
            b.rss[key] = max(b.rss.get(key, 0), proc_field(pid, "status", "VmHWM"))

    def find(root: Path) -> float:
        t = time.perf_counter()
        out = shell(f"find {shlex.quote(str(root))} -type f -printf '%s\\n'", b.remaining_s()).stdout
        elapsed = time.perf_counter() - t
        sizes = [int(s) for s in out.split()]
        if len(sizes) != files or sum(sizes) != tree_bytes:
            raise RuntimeError(
                f"{peer.name}: find saw {len(sizes)} files, {sum(sizes)} bytes; expected {files}, {tree_bytes}"
            )
        return elapsed

    def read_all(root: Path, procs: int) -> float:
        cmd = f"find {shlex.quote(str(root))} -type f -print0 | xargs -0 -P{procs} cat > /dev/null"
        t = time.perf_counter()
        shell(cmd, b.remaining_s())
        return time.perf_counter() - t

    with b.mounted(peer) as (root, pid):
        drop_caches()
        b.add(peer.name, "find_cold_s", find(root))
        b.add(peer.name, "find_warm_s", find(root))
        note_rss(pid)
    with b.mounted(peer) as (root, pid):
        drop_caches()
        b.add(peer.name, "readall_p8_cold_s", read_all(root, 8))
        b.add(peer.name, "readall_p8_warm_s", read_all(root, 8))
        note_rss(pid)
    with b.mounted(peer) as (root, pid):
        drop_caches()
        b.add(peer.name, "readall_p1_cold_s", read_all(root, 1))
        note_rss(pid)


# -- report --------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


def report(b: Bench, big_bytes: int, files: int, tree_bytes: int, reps: int) -> dict[str, object]:
    r = b.results

    def mbps(peer: str, metric: str, fn: str) -> float:
        times = r[peer][metric]
        return big_bytes / (min(times) if fn == "best" else med(times)) / 1e6

    lines = [
        f"big file: {big_bytes >> 20} MiB of os.urandom; tree: {files} files, {tree_bytes / 2**20:.0f} MiB;"
        f" {reps} repetitions (median, best in brackets)"
    ]
    lines.append("")
    lines.append(f"{'sequential read':<18} {'cold MB/s':>17} {'re-read MB/s':>19} {'daemon rd/MiB':>14}")
    for peer in ("plain", "blobmount-none", "squashfuse-none", "squashfuse-zstd"):
        if peer not in r:
            continue
        cold = f"{mbps(peer, 'seq_cold_s', 'median'):.0f} ({mbps(peer, 'seq_cold_s', 'best'):.0f})"
        warm = f"{mbps(peer, 'seq_warm_s', 'median'):.0f} ({mbps(peer, 'seq_warm_s', 'best'):.0f})"
        sysc = f"{med(b.syscr_per_mib[peer]):.1f}" if peer in b.syscr_per_mib else "-"
        lines.append(f"{peer:<18} {cold:>17} {warm:>19} {sysc:>14}")
    lines.append("")
    heads = ("find cold s", "find warm s", "read P8 cold s", "read P8 warm s", "read P1 cold s")
    lines.append(f"{'tree':<18} " + " ".join(f"{h:>15}" for h in heads))
    for peer in ("plain", "blobmount-zstd", "blobmount-none", "squashfuse-gzip", "squashfuse-zstd", "squashfuse-none"):
        if peer not in r:
            continue
        cells = [f"{med(r[peer][m]):.2f} ({min(r[peer][m]):.2f})" for m in TREE_METRICS]
        lines.append(f"{peer:<18} " + " ".join(f"{c:>15}" for c in cells))
    lines.append("")

    def ratio(a: str, bb: str, metric: str) -> float:
        return med(r[a][metric]) / med(r[bb][metric])

    # (label, value, target, higher is better); throughput ratios are inverted time ratios
    ratios: list[tuple[str, float, float | None, bool]] = [
        (
            "seq cold MB/s blobmount / squashfuse (both uncompressed)",
            ratio("squashfuse-none", "blobmount-none", "seq_cold_s"),
            0.8,
            True,
        ),
        (
            "seq cold MB/s blobmount / squashfuse -comp zstd",
            ratio("squashfuse-zstd", "blobmount-none", "seq_cold_s"),
            None,
            True,
        ),
        ("seq cold MB/s blobmount / plain", ratio("plain", "blobmount-none", "seq_cold_s"), None, True),
        ("re-read MB/s blobmount / plain", ratio("plain", "blobmount-none", "seq_warm_s"), 0.9, True),
        (
            "find cold time blobmount-zstd / squashfuse-zstd",
            ratio("blobmount-zstd", "squashfuse-zstd", "find_cold_s"),
            1.5,
            False,
        ),
        (
            "find cold time blobmount-none / squashfuse-none",
            ratio("blobmount-none", "squashfuse-none", "find_cold_s"),
            1.5,
            False,
        ),
        (
            "find warm time blobmount-zstd / squashfuse-zstd",
            ratio("blobmount-zstd", "squashfuse-zstd", "find_warm_s"),
            None,
            False,
        ),
        (
            "read-all P8 cold time blobmount-zstd / squashfuse-zstd",
            ratio("blobmount-zstd", "squashfuse-zstd", "readall_p8_cold_s"),
            None,
            False,
        ),
        (
            "read-all P1 cold time blobmount-zstd / squashfuse-zstd",
            ratio("blobmount-zstd", "squashfuse-zstd", "readall_p1_cold_s"),
            None,
            False,
        ),
        (
            "read-all P8 cold time blobmount-none / squashfuse-none",
            ratio("blobmount-none", "squashfuse-none", "readall_p8_cold_s"),
            None,
            False,
        ),
        (
            "read-all P1 cold time blobmount-none / squashfuse-none",
            ratio("blobmount-none", "squashfuse-none", "readall_p1_cold_s"),
            None,
            False,
        ),
        (
            "read-all P8 warm time blobmount-zstd / plain",
            ratio("blobmount-zstd", "plain", "readall_p8_warm_s"),
            None,
            False,
        ),
    ]
    if "squashfuse-gzip" in r:
        ratios.append(
            (
                "find cold time blobmount-zstd / squashfuse-gzip (mksquashfs default)",
                ratio("blobmount-zstd", "squashfuse-gzip", "find_cold_s"),
                None,
                False,
            )
        )
        ratios.append(
            (
                "read-all P8 cold time blobmount-zstd / squashfuse-gzip",
                ratio("blobmount-zstd", "squashfuse-gzip", "readall_p8_cold_s"),
                None,
                False,
            )
        )
    lines.append(f"{'ratio (medians, same run)':<72} {'value':>6}  target")
    for label, value, target, higher in ratios:
        verdict = ""
        if target is not None:
            ok = value >= target if higher else value <= target
            verdict = f"{'>=' if higher else '<='} {target}  {'met' if ok else 'MISSED'}"
        lines.append(f"{label:<72} {value:>6.2f}  {verdict}")
    lines.append("")
    rss_cells = [f"{k} {v / 2**20:.1f}" for k, v in sorted(b.rss.items())]
    lines.append("daemon peak RSS (VmHWM, MiB): " + ", ".join(rss_cells))
    if b.read_ahead_kb:
        kbs = sorted(set(b.read_ahead_kb.values()))
        lines.append(f"FUSE mounts' read_ahead_kb (bdi): {', '.join(map(str, kbs))}")
    print("\n".join(lines))
    return {
        "ratios": {label: {"value": v, "target": t, "higher_is_better": h} for label, v, t, h in ratios},
        "table": lines,
    }


# -- main ----------------------------------------------------------------------------------------


def _raise_on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every finally: unmount, clean up


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fs_local", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB file, ~2,000 files, no gzip squashfs (< 1 min)")
    ap.add_argument("--reps", type=int, default=None, help=f"repetitions (default {REPS}; 1 with --quick)")
    ap.add_argument(
        "--json",
        nargs="?",
        type=Path,
        const=Path("default"),
        default=None,
        metavar="OUT",
        help="write results as JSON (default bench/results/<date>-fs_local.json)",
    )
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=Path(os.environ.get("BENCH_DIR", "/var/tmp")),
        help="where the temporary data goes (same disk for every peer)",
    )
    ap.add_argument("--time-limit", type=float, default=3 * 3600.0, help="seconds for the whole run")
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else REPS)
    if not 1 <= reps <= 20:
        raise SystemExit("--reps: 1..20")
    if os.geteuid() != 0:
        raise SystemExit("needs root: cold runs drop the page cache via /proc/sys/vm/drop_caches")
    for tool in ("squashfuse", "mksquashfs", "fusermount3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install squashfuse squashfs-tools fuse3)")
    big_bytes = BIG_BYTES_QUICK if args.quick else BIG_BYTES_FULL
    tree_max = TREE_FILES_QUICK if args.quick else TREE_MAX_FILES_FULL
    tree_min = TREE_FILES_QUICK // 2 if args.quick else TREE_MIN_FILES_FULL
    # big file x4 (plain, archive, two images); the tree (<= ~1 GiB) x5 in the worst case
    need = 4 * big_bytes + (512 << 20 if args.quick else 5 << 30) + DISK_MARGIN_BYTES
    free = shutil.disk_usage(args.work_dir).free
    if free < need:
        raise SystemExit(f"need {need / 2**30:.1f} GiB free in {args.work_dir}, have {free / 2**30:.1f} GiB")

    old_term = signal.signal(signal.SIGTERM, _raise_on_term)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-fs-local-", dir=args.work_dir))
    b = Bench(work, started + args.time_limit)
    try:
        info, info_line = machine()
        print(info_line, flush=True)
        (work / "big").mkdir()
        make_big(work / "big" / "big.bin", big_bytes)
        files, tree_bytes = make_tree(work / "tree", tree_min, tree_max)
        bm = [sys.executable, "-m", "blobmount.cli", "create"]
        build_s = {
            "blobmount-none big": run_quiet([*bm, "--compression", "none", str(work / "big"), str(work / "a-big")]),
            "blobmount-zstd tree": run_quiet([*bm, str(work / "tree"), str(work / "a-tree")]),
            "blobmount-none tree": run_quiet(
                [*bm, "--compression", "none", str(work / "tree"), str(work / "a-tree-none")]
            ),
        }
        squash = ["mksquashfs"]
        for name, src, image, opts in (
            ("squashfuse-none big", "big", "big-none.sqfs", MKSQUASHFS_NONE),
            ("squashfuse-zstd big", "big", "big-zstd.sqfs", ("-comp", "zstd")),
            ("squashfuse-zstd tree", "tree", "tree-zstd.sqfs", ("-comp", "zstd")),
            ("squashfuse-none tree", "tree", "tree-none.sqfs", MKSQUASHFS_NONE),
            *([] if args.quick else [("squashfuse-gzip tree", "tree", "tree-gzip.sqfs", ())]),
        ):
            build_s[name] = run_quiet([*squash, str(work / src), str(work / image), *MKSQUASHFS_COMMON, *opts])
        print(
            f"data: {big_bytes >> 20} MiB file; tree of {files} files, {tree_bytes / 2**20:.0f} MiB;"
            f" built in {time.monotonic() - started:.0f} s"
        )
        big_peers = [
            Peer("plain", "plain", work / "big"),
            Peer("blobmount-none", "blobmount", work / "a-big"),
            Peer("squashfuse-none", "squashfuse", work / "big-none.sqfs"),
            Peer("squashfuse-zstd", "squashfuse", work / "big-zstd.sqfs"),
        ]
        tree_peers = [
            Peer("plain", "plain", work / "tree"),
            Peer("blobmount-zstd", "blobmount", work / "a-tree"),
            Peer("blobmount-none", "blobmount", work / "a-tree-none"),
            Peer("squashfuse-zstd", "squashfuse", work / "tree-zstd.sqfs"),
            Peer("squashfuse-none", "squashfuse", work / "tree-none.sqfs"),
        ]
        if not args.quick:
            tree_peers.append(Peer("squashfuse-gzip", "squashfuse", work / "tree-gzip.sqfs"))
        for rep in range(reps):
            for peer in big_peers:
                bench_big(b, peer, big_bytes)
            for peer in tree_peers:
                bench_tree(b, peer, files, tree_bytes)
            print(f"repetition {rep + 1}/{reps} done at {time.monotonic() - started:.0f} s", flush=True)
        print()
        summary = report(b, big_bytes, files, tree_bytes, reps)
        print(f"\ntotal {time.monotonic() - started:.0f} s, {b.mounts} mounts")
        if args.json is not None:
            out = args.json
            if out == Path("default"):
                day = datetime.date.today().isoformat()
                out = Path(__file__).resolve().parent / "results" / f"{day}-fs_local.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            doc = {
                "machine": info,
                "quick": args.quick,
                "reps": reps,
                "big_bytes": big_bytes,
                "tree_files": files,
                "tree_bytes": tree_bytes,
                "build_s": build_s,
                "seconds": b.results,
                "daemon_peak_rss_bytes": b.rss,
                "daemon_read_syscalls_per_mib": b.syscr_per_mib,
                "fuse_read_ahead_kb": b.read_ahead_kb,
                **summary,
            }
            tmp = out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
            tmp.replace(out)
            print(f"wrote {out}")
    finally:
        b.stop_all()
        shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)
    return 0


if __name__ == "__main__":
    sys.exit(main())
