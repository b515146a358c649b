"""The workloads: the same command for every peer, run in a child process with a time limit.

tree dataset (small files):
- ``find``: ``find MNT -type f -printf '%s\\n'`` (its output is checked: every file, every byte);
- ``readall_p8`` / ``readall_p1``: ``find MNT -type f -print0 | xargs -0 -P8 cat > /dev/null`` (-P1);
- ``import``: ``python -S -c 'sys.path.insert(0, MNT/py); import hypothesis'`` (~200 modules and
  their bytecode, from the mount);
- ``git_status``: ``git --no-optional-locks -C MNT status --porcelain`` with the stat checks a
  different filesystem cannot pass turned off (inode, device, ctime, mode bits), so git stats every
  file and reads every .gitignore, as on a checkout;
big dataset (throughput):
- ``seq``: ``cat MNT/big.bin > /dev/null`` (1 GiB);
- ``rand4k``: 2,000 preads of 4 KiB at random 4 KiB-aligned offsets of big.bin (seeded: every peer
  reads the same offsets), one thread;
- ``par8``: ``xargs -P8`` running one ``cat`` per file of par/ (8 readers of 8 different files);
both: ``ready`` (mount-ready, then time to first byte of one small file) is driven by the suite.

A run that exceeds its time limit is killed (its whole process group) and recorded as a timeout.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.datasets import IMPORT_MODULE, PAR_FILES, Dataset

RAND_READS = 2_000
RAND_SEED = 20_260_101
RAND_BLOCK_BYTES = 4096
TREE_WORKLOADS = ("find", "readall_p8", "readall_p1", "import", "git_status")
BIG_WORKLOADS = ("seq", "rand4k", "par8")
GIT_FLAGS = (
    "-c", "core.checkStat=minimal", "-c", "core.trustctime=false", "-c", "core.fileMode=false",
    "-c", "safe.directory=*", "-c", "core.untrackedCache=false",
)  # fmt: skip


class RunTimeout(Exception):
    pass


@dataclass
class Outcome:
    seconds: float
    bytes_read: int | None = None  # what the workload read through the filesystem (None: metadata only)
    extra: dict[str, object] = field(default_factory=dict)


def run_child(cmd: list[str], timeout_s: float, shell: bool = False) -> tuple[float, bytes]:
    """Run `cmd` in its own process group; (wall seconds, stdout). On timeout the whole group is
    killed (xargs' cats too) and RunTimeout raised; a non-zero exit raises RuntimeError."""
    argv = ["bash", "-o", "pipefail", "-c", cmd[0]] if shell else cmd
    t = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RunTimeout(f"over {timeout_s:.0f} s") from None
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}: {err.decode(errors='replace')[-800:]}")
    return elapsed, out


def probe(args: list[str], timeout_s: float) -> dict[str, object]:
    _, out = run_child([sys.executable, "-m", "bench.probe", *args], timeout_s)
    result: dict[str, object] = json.loads(out)
    return result


def run(workload: str, root: Path, ds: Dataset, timeout_s: float) -> Outcome:
    q = shlex.quote(str(root))
    if workload == "find":
        seconds, out = run_child([f"find {q} -type f -printf '%s\\n'"], timeout_s, shell=True)
        sizes = [int(s) for s in out.split()]
        if len(sizes) != ds.files or sum(sizes) != ds.bytes:
            raise RuntimeError(f"find saw {len(sizes)} files, {sum(sizes)} bytes; the tree has {ds.files}, {ds.bytes}")
        return Outcome(seconds)
    if workload in ("readall_p8", "readall_p1"):
        procs = workload[-1]
        seconds, _ = run_child([f"find {q} -type f -print0 | xargs -0 -P{procs} cat > /dev/null"], timeout_s, True)
        return Outcome(seconds, ds.bytes)
    if workload == "import":
        code = (
            f"import sys; sys.path.insert(0, {str(root / 'py')!r}); import {IMPORT_MODULE};"
            f" assert {IMPORT_MODULE}.__file__.startswith({str(root)!r}), {IMPORT_MODULE}.__file__"
        )
        seconds, _ = run_child([sys.executable, "-S", "-c", code], timeout_s)
        return Outcome(seconds)
    if workload == "git_status":
        seconds, out = run_child(
            ["git", "--no-optional-locks", *GIT_FLAGS, "-C", str(root), "status", "--porcelain"], timeout_s
        )
        return Outcome(seconds, None, {"changed_paths": len(out.splitlines())})
    if workload == "seq":
        size = (root / "big.bin").stat().st_size
        seconds, _ = run_child([f"cat {shlex.quote(str(root / 'big.bin'))} > /dev/null"], timeout_s, shell=True)
        return Outcome(seconds, size)
    if workload == "rand4k":
        r = probe(["randread", str(root / "big.bin"), str(RAND_READS), str(RAND_SEED)], timeout_s)
        return Outcome(float(r["seconds"]), RAND_READS * RAND_BLOCK_BYTES)  # type: ignore[arg-type]
    if workload == "par8":
        files = " ".join(shlex.quote(str(root / "par" / f"p{i}.bin")) for i in range(PAR_FILES))
        cmd = f"printf '%s\\0' {files} | xargs -0 -P{PAR_FILES} -n1 cat > /dev/null"
        seconds, _ = run_child([cmd], timeout_s, shell=True)
        size = sum((root / "par" / f"p{i}.bin").stat().st_size for i in range(PAR_FILES))
        return Outcome(seconds, size)
    raise ValueError(f"unknown workload {workload}")


def curl_whole(url: str, timeout_s: float) -> tuple[float, int]:
    """(seconds, bytes) of one curl downloading `url` to /dev/null (curl's own total time)."""
    _, out = run_child(["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url], timeout_s)
    size, seconds = out.decode().split()
    return float(seconds), int(float(size))


def curl_ranges(url: str, size: int, streams: int, timeout_s: float) -> float:
    """Seconds for `streams` curls in parallel, each fetching one contiguous 1/streams of `url`."""
    step = -(-size // streams)
    parts = [f"curl -sf -o /dev/null -r {i * step}-{min(size, (i + 1) * step) - 1} {shlex.quote(url)} &"
             for i in range(streams)]  # fmt: skip
    wait_all = 'for p in $(jobs -p); do wait "$p" || exit 1; done'
    seconds, _ = run_child([" ".join(parts) + " " + wait_all], timeout_s, shell=True)
    return seconds
