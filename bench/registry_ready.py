"""Mounting from a registry: mount-ready time, time to first byte, requests and bytes per operation.

Runs the same measurements against docker-registry on loopback and inside the netshape namespace
(../shared/tools/netshape: DELAY_MS per round trip, RATE cap). Requests and bytes come from the
registry's own access log, so nothing is estimated.
Target (issue 4): mount-ready minus `blobmount --version` <= 5 RTT + index transfer time; reading one
64 KiB file out of a 1 GiB archive fetches <= 2 chunks plus index and manifest.

    python -m bench.registry_ready [--quick] [--delay-ms 10] [--rate 1gbit] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

NETSHAPE = Path(__file__).resolve().parents[2] / "shared" / "tools" / "netshape" / "netshape.sh"
NS_IP = "10.200.0.2"
REGISTRY_BIN = "/usr/bin/docker-registry"
REPS = 5
LOG_LINE = re.compile(r'"(GET|HEAD|PUT|POST|PATCH) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


def start_registry(root: Path, addr: str, netns: bool) -> subprocess.Popen[bytes]:
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": addr},
    }
    (root / "config.yml").write_text(json.dumps(config))
    cmd = [REGISTRY_BIN, "serve", str(root / "config.yml")]
    if netns:
        cmd = ["ip", "netns", "exec", "benchnet", *cmd]
    log = open(root / "access.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    log.close()
    host, port = addr.rsplit(":", 1)
    deadline = time.monotonic() + 20
    while subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://{host}:{port}/v2/"], check=False).returncode:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"registry at {addr} did not start: {(root / 'access.log').read_text()[-500:]}")
        time.sleep(0.1)
    return proc


def log_requests(root: Path, since: int) -> tuple[list[tuple[str, str, int, int]], int]:
    text = (root / "access.log").read_text(errors="replace")
    rows = []
    for m in LOG_LINE.finditer(text[since:]):
        size = int(m.group(4)) if m.group(4) != "-" else 0
        rows.append((m.group(1), m.group(2), int(m.group(3)), size))
    return rows, len(text)


@contextlib.contextmanager
def netshape(delay_ms: int, rate: str) -> Iterator[None]:
    env = dict(os.environ, DELAY_MS=str(delay_ms), RATE=rate)
    subprocess.run(["bash", str(NETSHAPE), "up"], check=True, env=env, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["bash", str(NETSHAPE), "down"], check=False, env=env, capture_output=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def rtt_s(host: str, port: str) -> float:
    """Median TCP connect time to the registry: one round trip."""
    out = []
    for _ in range(5):
        r = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{time_connect}", f"http://{host}:{port}/v2/"],
            capture_output=True,
            text=True,
            check=True,
        )
        out.append(float(r.stdout))
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="64 MiB archive, 2 reps")
    ap.add_argument("--delay-ms", type=int, default=10)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    total = (64 << 20) if args.quick else (1 << 30)
    reps = 2 if args.quick else REPS
    work = Path(tempfile.mkdtemp(prefix="bench-reg-", dir="/var/tmp"))
    bm = [sys.executable, "-m", "blobmount.cli"]
    procs: list[subprocess.Popen[bytes]] = []
    report: dict[str, dict[str, object]] = {}
    try:
        src = work / "src"
        (src / "files").mkdir(parents=True)
        n = total // (64 << 10)
        for i in range(n):  # 64 KiB incompressible files, path-ordered in the data blob
            sub = src / "files" / f"d{i // 1000:03d}"
            sub.mkdir(exist_ok=True)
            (sub / f"f{i:06d}.bin").write_bytes(os.urandom(64 << 10))
        subprocess.run([*bm, "create", str(src), str(work / "arc")], check=True, capture_output=True)
        index_bytes = (work / "arc" / "index.blob").stat().st_size
        version_s = min(timed([*bm, "--version"]) for _ in range(5))
        # what a mount must import before it can do anything (trio, pyfuse3, httpx): the start-up floor
        imports_s = min(
            timed([sys.executable, "-c", "import blobmount.cli, blobmount.mount, blobmount.sources"]) for _ in range(5)
        )
        with netshape(args.delay_ms, args.rate):
            setups = {"loopback": ("127.0.0.1", False), f"netshape {args.delay_ms}ms {args.rate}": (NS_IP, True)}
            for label, (ip, in_ns) in setups.items():
                port = "5000" if in_ns else str(_free_port())
                root = work / f"reg{len(procs)}"
                procs.append(start_registry(root, f"{ip}:{port}", in_ns))
                ref = f"{ip}:{port}/bench/assets:v1"
                plain = ["--plain-http", f"{ip}:{port}"]
                subprocess.run(
                    [*bm, "push", "--archive", str(work / "arc"), ref, *plain], check=True, capture_output=True
                )
                rtt = rtt_s(ip, port)
                ready, ttfb, reqs, fetched = [], [], [], []
                for rep in range(reps):
                    mnt, cache = work / f"mnt{rep}{len(procs)}", work / f"cache{rep}{len(procs)}"
                    mnt.mkdir()
                    _, mark = log_requests(root, 0)
                    try:
                        ready.append(timed([*bm, ref, str(mnt), "--cache-dir", str(cache), *plain]))
                        mount_rows, mark2 = log_requests(root, mark)
                        t = time.perf_counter()
                        with open(mnt / "files" / "d000" / "f000007.bin", "rb") as f:
                            f.read(1)
                        ttfb.append(time.perf_counter() - t)
                        with open(mnt / "files" / "d000" / "f000007.bin", "rb") as f:
                            f.read()
                        read_rows, _ = log_requests(root, mark2)
                        reqs.append((len(mount_rows), len(read_rows)))
                        fetched.append(sum(r[3] for r in read_rows))
                    finally:
                        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
                        time.sleep(0.2)
                limit = 5 * rtt + index_bytes / (125e6 if "gbit" in args.rate else 1e9)
                report[label] = {
                    "rtt_ms": rtt * 1e3,
                    "mount_ready_s": ready,
                    "version_s": version_s,
                    "imports_s": imports_s,
                    "ttfb_s": ttfb,
                    "requests_mount_read": reqs,
                    "bytes_fetched_64k_read": fetched,
                    "limit_s": limit,
                }
                med = statistics.median(ready) - version_s
                print(
                    f"{label:<24} RTT {rtt * 1e3:5.1f} ms | mount-ready {statistics.median(ready) * 1e3:6.0f} ms"
                    f" (- --version {version_s * 1e3:.0f} ms = {med * 1e3:.0f} ms; 5 RTT + index {limit * 1e3:.0f} ms;"
                    f" ratio {med / limit:.2f}; - imports {imports_s * 1e3:.0f} ms:"
                    f" ratio {(statistics.median(ready) - imports_s) / limit:.2f})"
                    f" | TTFB {statistics.median(ttfb) * 1e3:5.1f} ms"
                    f" | requests mount/read {reqs[-1]} | bytes for one 64 KiB file {fetched[-1]}"
                )
        print(f"archive: {total >> 20} MiB data, {n} files of 64 KiB, index {index_bytes} bytes; {reps} reps")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        for proc in procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
