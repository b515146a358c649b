"""What every benchmark prints or saves next to its figures: the machine, the code measured, the load.

Figures from a shared, noisy machine are only comparable with the context they were taken in, so
each result file carries it. Nothing here measures anything.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


AUTO_JSON = Path("<auto>")  # what a bare --json parses to: the caller picks default_json_path()


def default_json_path(name: str) -> Path:
    """bench/results/<today>-<name>.json, where ``--json`` without a value writes."""
    return RESULTS / f"{datetime.date.today().isoformat()}-{name}.json"


def write_json(path: Path, doc: dict[str, object]) -> None:
    """Write `doc` next to `path` first and rename it into place, so a killed run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def machine() -> tuple[dict[str, object], str]:
    """The machine as a JSON-able dict and as one printable line."""
    cpu = "?"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    mem = 0
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        mem = int(next(ln for ln in lines if ln.startswith("MemTotal:")).split()[1]) * 1024
    info: dict[str, object] = {
        "nproc": os.cpu_count(),
        "memory_bytes": mem,
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    line = (
        f"machine: {cpu}, nproc {os.cpu_count()}, {mem / 2**30:.1f} GiB RAM, kernel {platform.release()},"
        f" Python {platform.python_version()}"
    )
    return info, line


def code_state() -> dict[str, str]:
    """Which blobmount code was measured: HEAD, the dirty files, a digest of the package's sources."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "blobmount").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=30, check=False)
            return done.stdout.decode(errors="replace").strip()
        return "?"

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "dirty": " ".join(git("status", "--porcelain", "--", "blobmount").split()),
        "package_sha256": digest.hexdigest()[:16],
    }


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (p99 of 2,000 samples is the 1,980th)."""
    rank = math.ceil(round(len(sorted_values) * fraction, 6))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes: the next read of any
    file, a server's included, comes from the disk (needs root)."""
    subprocess.run(["sync"], check=True, timeout=600)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def proc_number(pid: int, name: str, key: str) -> int:
    """A number from /proc/PID/status (VmHWM etc., in kB) or /proc/PID/io (rchar, syscr, ...)."""
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/{name} has no {key}")


def first_line(cmd: list[str], word: str) -> str:
    """The first output line of `cmd` that mentions `word` (version banners go to either stream)."""
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    except OSError:
        return "?"
    lines = (out.stdout + b"\n" + out.stderr).decode(errors="replace").splitlines()
    return next((line.strip() for line in lines if word in line), "?")


def raise_on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every finally, which cleans up


@contextlib.contextmanager
def cleanup_on_term() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the block, so `finally` clauses remove temporary data."""
    old = signal.signal(signal.SIGTERM, raise_on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
