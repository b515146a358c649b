"""blobmount over a local archive against squashfuse over a squashfs image of the same data and
against the plain files, all measured in the same run (issue 3's figures).

Data, built fresh in a temporary directory on one disk for every peer:
- one file of os.urandom blocks (1 GiB; 64 MiB with --quick): archived with ``--compression none``;
  squashfs uncompressed (``-noI -noD -noF -noX``) and ``-comp zstd``;
- a tree of >= 20,000 real files nobody here wrote (this Python's stdlib, /usr/include,
  /usr/share/doc, /usr/lib/python3, /usr/share/perl, more if short; ~2,000 with --quick), regular
  files only: archived with the default (zstd) and with none; squashfs ``-comp zstd``, uncompressed,
  and (full runs) mksquashfs' default (gzip).

Workloads, each repeated (3 by default; the configurations take turns within a repetition, so drift
and the neighbours' load hit them alike), reported as median and best:
- sequential read of the big file, cold: a fresh mount with an empty cache directory after
  ``sync; echo 3 > /proc/sys/vm/drop_caches``, so every peer (plain files too) reads from the disk;
  then a re-read in the same mount (the kernel's page cache). Both FUSE peers are also run with the
  mount's ``read_ahead_kb`` raised to 1024 (FUSE's own limit is 128 KiB: the daemon cannot ask for
  more in INIT, only root can raise it afterwards), to show what 1 MiB requests would buy;
- ``find MNT -type f -printf '%s\\n'``, cold (fresh mount, dropped caches) and again warm; its output
  is summed and checked against the tree;
- read every file, ``find -print0 | xargs -0 -P8 cat`` (cold, then warm in the same mount) and ``-P1``
  (cold);
- per daemon: peak RSS (VmHWM), CPU seconds (utime + stime) and read syscalls (/proc/PID/io syscr:
  one read of /dev/fuse per FUSE request, plus the daemon's own preads) of each workload.

    python -m bench.fs_local [--quick] [--reps N] [--json [OUT]]

Needs root (drop_caches), squashfuse, mksquashfs and fusermount3. Every mount is unmounted and every
daemon stopped by PID at the end, failure or not; the temporary data is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench._common import code_state, default_json_path, loadavg, raise_on_term
from bench._common import machine as common_machine

REPO = Path(__file__).resolve().parent.parent
REPS = 3
BIG_BYTES_FULL = 1 << 30
BIG_BYTES_QUICK = 64 << 20
TREE_MIN_FILES_FULL = 20_000  # the floor for the small-file tree
TREE_MAX_FILES_FULL = 30_000  # enough to dominate per-mount costs; bounds the copy
TREE_FILES_QUICK = 2_000
TREE_EXTRA_SOURCES = ("/usr/include", "/usr/share/doc", "/usr/lib/python3", "/usr/share/perl")
TREE_FALLBACK_SOURCES = (sysconfig.get_paths()["purelib"], "/usr/share", "/usr/lib")
URANDOM_BLOCK_BYTES = 8 << 20
READ_BUF_BYTES = 1 << 20  # application read size for the sequential read (cat would use 128 KiB)
BIG_READ_AHEAD_KB = 1024  # the raised read-ahead of the "+ra1M" peers (FUSE's max request is 1 MiB)
DISK_MARGIN_BYTES = 1 << 30
MOUNT_TIMEOUT_S = 60.0  # a mount answers in well under a second; a minute means it is broken
STOP_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 1800.0  # one workload run; a hang fails the bench instead of blocking forever
MKSQUASHFS_NONE = ("-noI", "-noD", "-noF", "-noX")
MKSQUASHFS_COMMON = ("-noappend", "-quiet", "-no-progress")
CLK_TCK = os.sysconf("SC_CLK_TCK")

TREE_METRICS = ("find_cold_s", "find_warm_s", "readall_p8_cold_s", "readall_p8_warm_s", "readall_p1_cold_s")
BIG_ORDER = (
    "plain",
    "blobmount-none",
    "squashfuse-none",
    "squashfuse-zstd",
    "blobmount-none+ra1M",
    "squashfuse-none+ra1M",
)
TREE_ORDER = ("plain", "blobmount-zstd", "blobmount-none", "squashfuse-zstd", "squashfuse-none", "squashfuse-gzip")
TREE_HEADS = ("find cold s", "find warm s", "read P8 cold s", "read P8 warm s", "read P1 cold s")


@dataclass(frozen=True, slots=True)
class Peer:
    """One way to present a data set: ``kind`` is plain/blobmount/squashfuse; ``image`` the plain
    directory, the archive directory or the squashfs image."""

    name: str
    kind: str
    image: Path
    read_ahead_kb: int | None = None  # raise the mount's bdi read-ahead to this after mounting


class Bench:
    """The work directory, the live daemons and the measurements of one run."""

    def __init__(self, work: Path, deadline: float) -> None:
        self.work = work
        self.mnt = work / "mnt"
        self.cache = work / "cache"
        self.logs = work / "logs"
        self.deadline = deadline
        self.live: dict[int, subprocess.Popen[bytes]] = {}
        self.seconds: dict[str, dict[str, list[float]]] = {}
        self.cpu_s: dict[str, dict[str, list[float]]] = {}
        self.syscr: dict[str, dict[str, list[float]]] = {}
        self.rss: dict[str, int] = {}
        self.read_ahead_kb: dict[str, int] = {}
        self.mounts = 0
        self.mnt.mkdir()
        self.logs.mkdir()

    def remaining_s(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the benchmark ran past its overall time limit")
        return left

    def measure(self, peer: Peer, metric: str, pid: int | None, run: Callable[[], float]) -> None:
        """Record `run()`'s seconds and, for a daemon, its CPU time and read syscalls meanwhile."""
        before = (daemon_cpu_s(pid), proc_number(pid, "io", "syscr")) if pid else (0.0, 0)
        self.seconds.setdefault(peer.name, {}).setdefault(metric, []).append(run())
        if pid:
            self.cpu_s.setdefault(peer.name, {}).setdefault(metric, []).append(daemon_cpu_s(pid) - before[0])
            calls = proc_number(pid, "io", "syscr") - before[1]
            self.syscr.setdefault(peer.name, {}).setdefault(metric, []).append(float(calls))
            key = f"{peer.name}/{'big' if metric.startswith('seq') else 'tree'}"
            self.rss[key] = max(self.rss.get(key, 0), proc_number(pid, "status", "VmHWM") * 1024)

    @contextlib.contextmanager
    def mounted(self, peer: Peer) -> Iterator[tuple[Path, int | None]]:
        """Yield (root to read, daemon PID or None for plain files): a fresh mount with an empty
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
            dev = os.stat(self.mnt).st_dev  # the first request: the daemon answers
            bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
            if peer.read_ahead_kb is not None:
                bdi.write_text(f"{peer.read_ahead_kb}\n")
            with contextlib.suppress(OSError, ValueError):
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


def proc_number(pid: int, name: str, key: str) -> int:
    """A number from /proc/PID/status (VmHWM etc., in kB) or /proc/PID/io."""
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/{name} has no {key}")


def daemon_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of stat)


def shell(cmd: str, timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], check=True, capture_output=True, timeout=min(timeout_s, RUN_TIMEOUT_S)
    )


def run_quiet(cmd: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, timeout=RUN_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr.decode(errors='replace')}")
    return time.perf_counter() - t


def read_file(path: Path, expected: int, timeout_s: float) -> float:
    """Seconds to read `path` start to end with READ_BUF_BYTES reads; checks the length."""
    view = memoryview(bytearray(READ_BUF_BYTES))
    total = 0
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        for _ in range(expected // READ_BUF_BYTES + 2):
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
                    if not stat.S_ISREG(st.st_mode):
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


def first_line(cmd: list[str], word: str) -> str:
    """The first output line of `cmd` that mentions `word` (version banners go to either stream)."""
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    except OSError:
        return "?"
    lines = (out.stdout + b"\n" + out.stderr).decode(errors="replace").splitlines()
    return next((line.strip() for line in lines if word in line), "?")


def machine() -> tuple[dict[str, object], str]:
    """bench._common's machine, plus the peers' versions."""
    info, line = common_machine()
    info["squashfuse"] = first_line(["squashfuse", "-V"], "squashfuse")
    info["mksquashfs"] = first_line(["mksquashfs", "-version"], "version")
    info["blobmount"] = first_line([sys.executable, "-m", "blobmount.cli", "--version"], "blobmount")
    return info, f"{line}; {info['squashfuse']}; {info['mksquashfs']}; {info['blobmount']}"


# -- workloads -----------------------------------------------------------------------------------


def bench_big(b: Bench, peer: Peer, big_bytes: int) -> None:
    with b.mounted(peer) as (root, pid):
        drop_caches()
        b.measure(peer, "seq_cold_s", pid, lambda: read_file(root / "big.bin", big_bytes, b.remaining_s()))
        b.measure(peer, "seq_warm_s", pid, lambda: read_file(root / "big.bin", big_bytes, b.remaining_s()))


def bench_tree(b: Bench, peer: Peer, files: int, tree_bytes: int) -> None:
    def find(root: Path) -> float:
        t = time.perf_counter()
        out = shell(f"find {shlex.quote(str(root))} -type f -printf '%s\\n'", b.remaining_s()).stdout
        elapsed = time.perf_counter() - t
        sizes = [int(s) for s in out.split()]
        if len(sizes) != files or sum(sizes) != tree_bytes:
            seen = f"{len(sizes)} files, {sum(sizes)} bytes"
            raise RuntimeError(f"{peer.name}: find saw {seen}; expected {files}, {tree_bytes}")
        return elapsed

    def read_all(root: Path, procs: int) -> float:
        cmd = f"find {shlex.quote(str(root))} -type f -print0 | xargs -0 -P{procs} cat > /dev/null"
        t = time.perf_counter()
        shell(cmd, b.remaining_s())
        return time.perf_counter() - t

    with b.mounted(peer) as (root, pid):
        drop_caches()
        b.measure(peer, "find_cold_s", pid, lambda: find(root))
        b.measure(peer, "find_warm_s", pid, lambda: find(root))
    with b.mounted(peer) as (root, pid):
        drop_caches()
        b.measure(peer, "readall_p8_cold_s", pid, lambda: read_all(root, 8))
        b.measure(peer, "readall_p8_warm_s", pid, lambda: read_all(root, 8))
    with b.mounted(peer) as (root, pid):
        drop_caches()
        b.measure(peer, "readall_p1_cold_s", pid, lambda: read_all(root, 1))


# -- report --------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


# fmt: off
RATIOS: list[tuple[str, str, str, str, float | None, bool]] = [
    # label; numerator and denominator peers; metric; target; higher is better (MB/s: times inverted)
    ("seq cold MB/s, blobmount / squashfuse (both uncompressed)",
     "squashfuse-none", "blobmount-none", "seq_cold_s", 0.8, True),
    ("seq cold MB/s, blobmount / squashfuse -comp zstd",
     "squashfuse-zstd", "blobmount-none", "seq_cold_s", None, True),
    ("seq cold MB/s, blobmount / plain",
     "plain", "blobmount-none", "seq_cold_s", None, True),
    ("seq cold MB/s, both read_ahead_kb=1024: blobmount / squashfuse",
     "squashfuse-none+ra1M", "blobmount-none+ra1M", "seq_cold_s", None, True),
    ("seq cold MB/s, blobmount read_ahead_kb=1024 / squashfuse default",
     "squashfuse-none", "blobmount-none+ra1M", "seq_cold_s", None, True),
    ("re-read MB/s, blobmount / plain",
     "plain", "blobmount-none", "seq_warm_s", 0.9, True),
    ("re-read MB/s, squashfuse / plain (the same kernel path)",
     "plain", "squashfuse-none", "seq_warm_s", None, True),
    ("find cold time, blobmount-zstd / squashfuse-zstd",
     "blobmount-zstd", "squashfuse-zstd", "find_cold_s", 1.5, False),
    ("find cold time, blobmount-none / squashfuse-none",
     "blobmount-none", "squashfuse-none", "find_cold_s", 1.5, False),
    ("find cold time, blobmount-zstd / squashfuse-gzip (mksquashfs default)",
     "blobmount-zstd", "squashfuse-gzip", "find_cold_s", 1.5, False),
    ("find warm time, blobmount-zstd / squashfuse-zstd",
     "blobmount-zstd", "squashfuse-zstd", "find_warm_s", None, False),
    ("read-all P8 cold time, blobmount-zstd / squashfuse-zstd",
     "blobmount-zstd", "squashfuse-zstd", "readall_p8_cold_s", None, False),
    ("read-all P1 cold time, blobmount-zstd / squashfuse-zstd",
     "blobmount-zstd", "squashfuse-zstd", "readall_p1_cold_s", None, False),
    ("read-all P8 cold time, blobmount-none / squashfuse-none",
     "blobmount-none", "squashfuse-none", "readall_p8_cold_s", None, False),
    ("read-all P1 cold time, blobmount-none / squashfuse-none",
     "blobmount-none", "squashfuse-none", "readall_p1_cold_s", None, False),
    ("read-all P8 cold time, blobmount-zstd / squashfuse-gzip",
     "blobmount-zstd", "squashfuse-gzip", "readall_p8_cold_s", None, False),
    ("read-all P8 warm time, blobmount-zstd / squashfuse-zstd",
     "blobmount-zstd", "squashfuse-zstd", "readall_p8_warm_s", None, False),
]
# fmt: on


def report(b: Bench, big_bytes: int, files: int, tree_bytes: int, reps: int) -> dict[str, object]:
    s = b.seconds
    mib = big_bytes / 2**20

    def mbps(times: list[float]) -> str:
        return f"{big_bytes / med(times) / 1e6:.0f} ({big_bytes / min(times) / 1e6:.0f})"

    lines = [
        f"big file: {big_bytes >> 20} MiB of os.urandom; tree: {files} files, {tree_bytes / 2**20:.0f} MiB;"
        f" {reps} repetition(s): median (best)",
        "",
        f"{'sequential read':<22} {'cold MB/s':>13} {'re-read MB/s':>15} {'CPU s/GiB':>10} {'rd/MiB':>7}"
        f" {'re-read rd':>10}",
    ]
    for peer in (p for p in BIG_ORDER if p in s and "seq_cold_s" in s[p]):
        ms = s[peer]
        cpu = b.cpu_s.get(peer, {})
        calls = b.syscr.get(peer, {})
        cpu_cell = f"{med(cpu['seq_cold_s']) / mib * 1024:.2f}" if cpu else "-"
        rd_cell = f"{med(calls['seq_cold_s']) / mib:.1f}" if calls else "-"
        warm_rd = f"{med(calls['seq_warm_s']):.0f}" if calls else "-"
        lines.append(
            f"{peer:<22} {mbps(ms['seq_cold_s']):>13} {mbps(ms['seq_warm_s']):>15} {cpu_cell:>10} {rd_cell:>7}"
            f" {warm_rd:>10}"
        )
    lines += ["", f"{'tree: seconds':<22} " + " ".join(f"{h:>15}" for h in TREE_HEADS)]
    tree_peers = [p for p in TREE_ORDER if p in s and "find_cold_s" in s[p]]
    for peer in tree_peers:
        cells = [f"{med(s[peer][m]):.2f} ({min(s[peer][m]):.2f})" for m in TREE_METRICS]
        lines.append(f"{peer:<22} " + " ".join(f"{c:>15}" for c in cells))
    lines += ["", f"{'tree: daemon CPU s':<22} " + " ".join(f"{h:>15}" for h in TREE_HEADS)]
    for peer in tree_peers:
        if peer in b.cpu_s:
            lines.append(f"{peer:<22} " + " ".join(f"{med(b.cpu_s[peer][m]):>15.2f}" for m in TREE_METRICS))
    lines += ["", f"{'ratio (medians, same run)':<72} {'value':>6}  target"]
    ratios: dict[str, dict[str, object]] = {}
    for label, num, den, metric, target, higher in RATIOS:
        if num not in s or den not in s:
            continue
        value = med(s[num][metric]) / med(s[den][metric])
        verdict = ""
        if target is not None:
            ok = value >= target if higher else value <= target
            verdict = f"{'>=' if higher else '<='} {target}  {'met' if ok else 'MISSED'}"
        lines.append(f"{label:<72} {value:>6.2f}  {verdict}")
        ratios[label] = {"value": round(value, 4), "target": target, "higher_is_better": higher}
    lines.append("")
    lines.append("daemon peak RSS (VmHWM, MiB): " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(b.rss.items())))
    kbs = ", ".join(f"{k} {v}" for k, v in sorted(b.read_ahead_kb.items()))
    lines.append(f"FUSE mounts' read_ahead_kb: {kbs}")
    lines.append("CPU s/GiB: daemon utime+stime per GiB read cold; rd/MiB: daemon read syscalls per MiB (one")
    lines.append("per FUSE request plus its preads); re-read rd: daemon read syscalls during the whole re-read")
    print("\n".join(lines))
    return {"ratios": ratios, "table": lines}


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fs_local", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB file, ~2,000 files, no gzip image (< 1 min)")
    ap.add_argument("--reps", type=int, default=REPS, help=f"repetitions (default {REPS})")
    ap.add_argument(
        "--json", nargs="?", type=Path, const=default_json_path("fs_local"), default=None, metavar="OUT",
        help="write the results as JSON (default OUT: bench/results/<date>-fs_local.json)",
    )  # fmt: skip
    ap.add_argument(
        "--work-dir", type=Path, default=Path(os.environ.get("BENCH_DIR", "/var/tmp")),
        help="where the temporary data goes (one disk for every peer; not a tmpfs)",
    )  # fmt: skip
    ap.add_argument("--time-limit", type=float, default=3 * 3600.0, help="seconds for the whole run")
    args = ap.parse_args(argv)
    reps: int = args.reps
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
    # the big file x4 (plain, archive, two images); the tree (<= ~1 GiB) x6 at worst
    need = 4 * big_bytes + (512 << 20 if args.quick else 6 << 30) + DISK_MARGIN_BYTES
    free = shutil.disk_usage(args.work_dir).free
    if free < need:
        raise SystemExit(f"need {need / 2**30:.1f} GiB free in {args.work_dir}, have {free / 2**30:.1f} GiB")

    old_term = signal.signal(signal.SIGTERM, raise_on_term)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-fs-local-", dir=args.work_dir))
    b = Bench(work, started + args.time_limit)
    try:
        info, info_line = machine()
        code_before = code_state()
        print(info_line)
        print(f"blobmount code: {code_before}; load average {loadavg()}", flush=True)
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
        for name, src, image, opts in (
            ("squashfuse-none big", "big", "big-none.sqfs", MKSQUASHFS_NONE),
            ("squashfuse-zstd big", "big", "big-zstd.sqfs", ("-comp", "zstd")),
            ("squashfuse-zstd tree", "tree", "tree-zstd.sqfs", ("-comp", "zstd")),
            ("squashfuse-none tree", "tree", "tree-none.sqfs", MKSQUASHFS_NONE),
            *([] if args.quick else [("squashfuse-gzip tree", "tree", "tree-gzip.sqfs", ())]),
        ):
            build_s[name] = run_quiet(["mksquashfs", str(work / src), str(work / image), *MKSQUASHFS_COMMON, *opts])
        print(
            f"data: {big_bytes >> 20} MiB file; tree of {files} files, {tree_bytes / 2**20:.0f} MiB;"
            f" built in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        big_peers = [
            Peer("plain", "plain", work / "big"),
            Peer("blobmount-none", "blobmount", work / "a-big"),
            Peer("squashfuse-none", "squashfuse", work / "big-none.sqfs"),
            Peer("squashfuse-zstd", "squashfuse", work / "big-zstd.sqfs"),
            Peer("blobmount-none+ra1M", "blobmount", work / "a-big", BIG_READ_AHEAD_KB),
            Peer("squashfuse-none+ra1M", "squashfuse", work / "big-none.sqfs", BIG_READ_AHEAD_KB),
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
        loads = [loadavg()]
        for rep in range(reps):
            for peer in big_peers:
                bench_big(b, peer, big_bytes)
            for peer in tree_peers:
                bench_tree(b, peer, files, tree_bytes)
            loads.append(loadavg())
            print(
                f"repetition {rep + 1}/{reps} done at {time.monotonic() - started:.0f} s, load {loads[-1]}", flush=True
            )
        print()
        summary = report(b, big_bytes, files, tree_bytes, reps)
        code_after = code_state()
        print(f"\nload average (1, 5, 15 min) before and after each repetition: {' | '.join(loads)}")
        if code_after["package_sha256"] != code_before["package_sha256"]:
            print(f"WARNING: blobmount's code changed during the run ({code_before} -> {code_after})")
        elif code_after != code_before:
            print(
                f"note: HEAD moved during the run ({code_before['head']} -> {code_after['head']}), blobmount/ did not"
            )
        print(f"total {time.monotonic() - started:.0f} s, {b.mounts} mounts")
        if args.json is not None:
            out: Path = args.json
            out.parent.mkdir(parents=True, exist_ok=True)
            doc = {
                "machine": info,
                "code": {"before": code_before, "after": code_after},
                "load_average": loads,
                "quick": args.quick,
                "reps": reps,
                "big_bytes": big_bytes,
                "tree_files": files,
                "tree_bytes": tree_bytes,
                "build_s": build_s,
                "seconds": b.seconds,
                "daemon_cpu_s": b.cpu_s,
                "daemon_read_syscalls": b.syscr,
                "daemon_peak_rss_bytes": b.rss,
                "fuse_read_ahead_kb": b.read_ahead_kb,
                **summary,
            }
            tmp = out.with_name(out.name + ".tmp")
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
