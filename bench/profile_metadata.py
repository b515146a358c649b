"""Where the daemon's time goes in cold metadata work (issue 17, item 4): py-spy samples a fresh
blobmount mount of the kernel-speed tree (bench/kernel_speed.py --prepare builds it) while it serves
a cold walk (``find -printf '%s'``: readdirplus, the kernel learns every entry from the listings),
and prints the functions with the most samples, self and inclusive, plus the FUSE requests served.

    flock /tmp/bench.lock python -m bench.profile_metadata [--md OUT]

py-spy must be installed in the venv (``pip install py-spy``). A profile, not a timing: the
figures are sample shares; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench._common import code_state, loadavg
from bench.janitor import Janitor, fresh_dir, unmount
from bench.kernel_speed import WORK_ROOT, _requests, _wait_mounted
from bench.peers import blobmount_cmd
from bench.servers import free_port

RATE_HZ = 250
LINE = re.compile(r":\d+\)$")
WORKER = "WorkerThread._work"  # stacks of trio's worker threads: left out (no thread work in a walk)
TOP = 25


def _summary(raw: Path) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, top self, top inclusive) from py-spy's collapsed stacks ("a;b;c count" lines)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or WORKER in stack:  # trio's idle thread cache: py-spy counts its timed wait
            continue
        count = int(count_s)
        frames = [LINE.sub(")", f) for f in stack.split(";")]  # per function, not per line
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
    return total, own.most_common(TOP), incl.most_common(TOP)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise SystemExit("py-spy is not installed in this venv: pip install py-spy")
    archives = sorted(WORK_ROOT.glob("tree-archive-*"), key=lambda p: p.stat().st_mtime)
    if not archives:
        raise SystemExit("no tree archive: run python -m bench.kernel_speed --prepare first")
    janitor = Janitor(WORK_ROOT)
    work = WORK_ROOT / "profile"
    fresh_dir(work)
    mnt = fresh_dir(work / "mnt")
    port = free_port()
    cmd = [*blobmount_cmd(), "mount", "-f", f"dir:{archives[-1]}", str(mnt)]
    cmd += ["--cache-dir", str(fresh_dir(work / "cache")), "--metrics", f"127.0.0.1:{port}"]
    url = f"http://127.0.0.1:{port}"
    load_start = loadavg()
    try:
        daemon = janitor.spawn(cmd, log=work / "daemon.log")
        _wait_mounted(mnt, daemon)
        time.sleep(0.5)  # the mount's own start is not profiled
        before = _requests(url)
        raw = work / "profile.txt"
        spy_proc = janitor.spawn(
            [str(spy), "record", "--pid", str(daemon.pid), "--rate", str(RATE_HZ), "--format", "raw", "-o", str(raw)],
            log=work / "py-spy.log",
        )
        time.sleep(1.0)  # py-spy attached
        started = time.perf_counter()
        subprocess.run(["find", str(mnt), "-printf", "%s\n"], check=True, stdout=subprocess.DEVNULL, timeout=600)
        walk_s = time.perf_counter() - started
        janitor.stop(spy_proc, first=signal.SIGINT)  # py-spy writes its file on SIGINT
        after = _requests(url)
    finally:
        unmount(mnt)
        janitor.stop_all()
    total, own, incl = _summary(raw)
    reqs = {op: int(n - before.get(op, 0)) for op, n in after.items() if n - before.get(op, 0)}
    lines = [
        f"# Cold metadata profile: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        "",
        f"`flock /tmp/bench.lock python -m bench.profile_metadata` at commit {code_state()['head']};"
        f" load {load_start} at the start, {loadavg()} at the end. py-spy {RATE_HZ} Hz on the daemon during a"
        f" cold `find MOUNT -printf '%s\\n'` of {archives[-1].name} ({walk_s:.3f} s); {total} samples"
        f" of the trio thread (py-spy leaves idle samples out; trio's idle worker threads are left out"
        f" here; epoll get_events is the loop waiting for the next request). FUSE requests: {reqs}.",
        "",
        "| self samples | share | function |",
        "|---|---|---|",
        *[f"| {n} | {n / max(total, 1):.1%} | `{name}` |" for name, n in own],
        "",
        "| inclusive samples | share | function |",
        "|---|---|---|",
        *[f"| {n} | {n / max(total, 1):.1%} | `{name}` |" for name, n in incl],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.md is not None:
        args.md.write_text(text)
        shutil.copy(raw, args.md.with_suffix(".collapsed.txt"))
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
