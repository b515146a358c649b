"""Mounting from a registry: mount-ready time, time to first byte, HTTP requests per operation and
the bytes fetched to read one 64 KiB file out of a 1 GiB archive; anonymous and bearer auth, on
loopback and through the netshape namespace.

Per network, two docker-registry processes serve the same storage: one anonymous, one with
`auth: token` trusting the test suite's token issuer (bench/token_issuer.py, its own process, in
the same network as the registry; anonymous pull tokens). With netshape (../shared/tools/netshape:
DELAY_MS per round trip, RATE cap on the server's side) `flock /tmp/netshape.lock` is held while
the namespace exists, and it is always torn down. Requests and bytes come from the registry's
access log and the issuer's request log, so nothing is estimated.

Targets (issue 4): mount-ready minus `blobmount --version` (same run, same code) <= 5 RTT + index
transfer time without auth, + 2 RTT with bearer auth; reading one 64 KiB file fetches <= 2 chunks
plus index and manifest. RTT is the median TCP connect time; index transfer time is curl's time
from the first to the last byte of the index blob.

Code variants, interleaved rep by rep: `new` is this tree's package; `--baseline REV` adds that
commit's package. Both are byte-compiled first, as `pip install` / `make install` do: this
environment sets PYTHONDONTWRITEBYTECODE=1, under which an editable tree recompiles every module
on every start. `--source` adds this tree's package run from source without bytecode (how the
first measurement of this figure was taken) to show that difference in the same run.

    python -m bench.registry_ready [--quick] [--baseline REV] [--source] [--delay-ms 10] [--rate 1gbit]
                                   [--no-netshape] [--json [OUT]]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import AUTO_JSON, REPO, cleanup_on_term, code_state, default_json_path, loadavg, machine, write_json

NETSHAPE = REPO.parent / "shared" / "tools" / "netshape" / "netshape.sh"
NETSHAPE_LOCK = Path("/tmp/netshape.lock")  # one netshape namespace per machine: everyone takes this
NS_IP = "10.200.0.2"
REGISTRY_BIN = "/usr/bin/docker-registry"
REPS = 5
START_WAIT_S = 20.0
LOG_LINE = re.compile(r'"(GET|HEAD|PUT|POST|PATCH) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')
ISSUER_NAME, TOKEN_SERVICE = "blobmount-test-issuer", "blobmount-test"  # as tests/servers.py
READ_FILE = Path("files") / "d000" / "f000007.bin"


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Target:
    """One registry to mount from: its network, auth, address and logs."""

    network: str
    auth: str  # "anonymous" or "bearer"
    host: str  # ip:port
    registry: Server
    issuer: Server | None = None
    rtt_s: float = 0.0
    index_transfer_s: float = 0.0
    rows: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # variant -> reps

    @property
    def label(self) -> str:
        return f"{self.network} {self.auth}"


def _spawn(cmd: list[str], log: Path, netns: bool) -> subprocess.Popen[bytes]:
    if netns:
        cmd = ["ip", "netns", "exec", "benchnet", *cmd]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_WAIT_S
    while subprocess.run(["curl", "-s", "-o", "/dev/null", url], check=False).returncode:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"{url} did not come up: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.1)


def start_registry(root: Path, storage: Path, addr: str, netns: bool, auth: dict[str, object] | None) -> Server:
    root.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}},
        "http": {"addr": addr},
    }
    if auth is not None:
        config["auth"] = auth
    (root / "config.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
    log = root / "access.log"
    proc = _spawn([REGISTRY_BIN, "serve", str(root / "config.yml")], log, netns)
    server = Server(proc, log)
    _wait_http(f"http://{addr}/v2/", proc, log)
    return server


def start_issuer(root: Path, key_dir: Path, addr: str, netns: bool) -> Server:
    root.mkdir(parents=True, exist_ok=True)
    log = root / "issuer.log"
    cmd = [sys.executable, "-m", "bench.token_issuer", "--listen", addr, "--key-dir", str(key_dir)]
    proc = _spawn(cmd, log, netns)
    server = Server(proc, log)
    _wait_http(f"http://{addr}/health", proc, log)  # 404 is an answer: it is up
    return server


def log_rows(path: Path, since: int) -> tuple[list[tuple[str, str, int, int]], int]:
    data = path.read_bytes()
    rows = []
    for m in LOG_LINE.finditer(data[since:].decode(errors="replace")):
        rows.append((m.group(1), m.group(2), int(m.group(3)), int(m.group(4)) if m.group(4) != "-" else 0))
    return rows, len(data)


def issuer_lines(server: Server | None, since: int) -> tuple[int, int]:
    """Token requests logged after `since` (bytes), and the new end of the log."""
    if server is None:
        return 0, 0
    data = server.log.read_bytes()
    return sum(1 for line in data[since:].splitlines() if line.startswith((b"GET ", b"POST "))), len(data)


@contextlib.contextmanager
def netshape(delay_ms: int, rate: str) -> Iterator[None]:
    """The netshape namespace, under the machine-wide lock; always torn down."""
    env = dict(os.environ, DELAY_MS=str(delay_ms), RATE=rate)
    with open(NETSHAPE_LOCK, "a") as lock:
        if os.environ.get("BENCH_VERBOSE"):
            print(f"waiting for {NETSHAPE_LOCK} ...", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            subprocess.run(["bash", str(NETSHAPE), "up"], check=True, env=env, capture_output=True)
            yield
        finally:
            subprocess.run(["bash", str(NETSHAPE), "down"], check=False, env=env, capture_output=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def curl_s(fmt: str, url: str) -> float:
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", fmt, url], capture_output=True, text=True, check=True)
    return float(out.stdout)


def measure_link(target: Target, index_url: str) -> None:
    """RTT (median TCP connect) and the index blob's transfer time (first to last byte)."""
    host = target.host
    target.rtt_s = statistics.median(curl_s("%{time_connect}", f"http://{host}/v2/") for _ in range(5))
    transfers = []
    for _ in range(5):
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{time_starttransfer} %{time_total}", index_url],
            capture_output=True,
            text=True,
            check=True,
        )
        first, total = (float(x) for x in out.stdout.split())
        transfers.append(total - first)
    target.index_transfer_s = statistics.median(transfers)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    return timed_cpu(cmd, env)[0]


def timed_cpu(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall time of `cmd`, and the CPU time of that process (not of the daemon it leaves behind,
    which nobody here waits for): the CPU figure hardly moves with the machine's load."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=env["BENCH_CWD"])
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def prepare_variants(work: Path, baseline: str | None, source: bool) -> dict[str, dict[str, str]]:
    """variant -> environment: a copy of a package on PYTHONPATH (ahead of the editable install)."""
    variants: dict[str, tuple[Path, bool]] = {}
    new = work / "pkg-new"
    shutil.copytree(REPO / "blobmount", new / "blobmount", ignore=shutil.ignore_patterns("__pycache__"))
    variants["new"] = (new, True)
    if baseline:
        old = work / "pkg-baseline"
        old.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", baseline, "blobmount"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        variants[f"baseline {baseline}"] = (old, True)
    if source:
        src = work / "pkg-source"
        shutil.copytree(REPO / "blobmount", src / "blobmount", ignore=shutil.ignore_patterns("__pycache__"))
        variants["new, not compiled"] = (src, False)
    envs = {}
    neutral = work / "cwd"  # `python -m` puts the working directory first on sys.path: not the repo
    neutral.mkdir()
    for name, (root, compiled) in variants.items():
        if compiled:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "blobmount")], check=True)
        env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1", BENCH_CWD=str(neutral))
        where = subprocess.run(
            [sys.executable, "-c", "import blobmount; print(blobmount.__file__)"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=neutral,
        ).stdout.strip()
        if not where.startswith(str(root)):
            raise SystemExit(f"variant {name!r} would run {where}, not its copy under {root}")
        envs[name] = env
    return envs


def mount_once(target: Target, env: dict[str, str], work: Path, tag: str) -> dict[str, float]:
    """Mount (fresh cache), time to the first byte of a 64 KiB file, read it whole; unmount."""
    bm = [sys.executable, "-m", "blobmount.cli"]
    ref = f"{target.host}/bench/assets:v1"
    tag = re.sub(r"[^A-Za-z0-9]+", "-", tag)
    mnt, cache = work / f"mnt-{tag}", work / f"cache-{tag}"
    mnt.mkdir()
    _, mark = log_rows(target.registry.log, 0)
    _, imark = issuer_lines(target.issuer, 0)
    try:
        ready, cpu = timed_cpu([*bm, ref, str(mnt), "--cache-dir", str(cache), "--plain-http", target.host], env)
        mount_rows, mark2 = log_rows(target.registry.log, mark)
        mount_tokens, imark2 = issuer_lines(target.issuer, imark)
        t = time.perf_counter()
        with open(mnt / READ_FILE, "rb") as f:
            f.read(1)
        ttfb = time.perf_counter() - t
        with open(mnt / READ_FILE, "rb") as f:
            whole = len(f.read())
        time.sleep(0.05)  # the access log is written after the answer
        read_rows, _ = log_rows(target.registry.log, mark2)
        read_tokens, _ = issuer_lines(target.issuer, imark2)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
        time.sleep(0.2)
        shutil.rmtree(cache, ignore_errors=True)
    return {
        "mount_ready_s": ready,
        "mount_cpu_s": cpu,
        "ttfb_s": ttfb,
        "mount_requests": len(mount_rows) + mount_tokens,
        "mount_token_requests": mount_tokens,
        "mount_401s": sum(1 for r in mount_rows if r[2] == 401),
        "read_requests": len(read_rows) + read_tokens,
        "read_401s": sum(1 for r in read_rows if r[2] == 401),
        "read_bytes": sum(r[3] for r in read_rows if r[2] in (200, 206)),
        "file_bytes": whole,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.registry_ready", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB archive, 2 reps")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--baseline", metavar="REV", help="also measure this commit's package")
    ap.add_argument("--source", action="store_true", help="also run this tree uncompiled")
    ap.add_argument("--delay-ms", type=int, default=10)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--no-netshape", action="store_true", help="loopback only")
    ap.add_argument("--json", type=Path, nargs="?", const=AUTO_JSON)
    args = ap.parse_args(argv)
    total = (64 << 20) if args.quick else (1 << 30)
    reps = args.reps or (2 if args.quick else REPS)
    info, line = machine()
    print(line)
    state = code_state()
    print(f"code: {state}; load {loadavg()}")
    work = Path(tempfile.mkdtemp(prefix="bench-reg-", dir="/var/tmp"))
    servers: list[Server] = []
    report: dict[str, object] = {"machine": info, "code": state, "load_start": loadavg(), "results": {}}
    try:
        with cleanup_on_term():
            envs = prepare_variants(work, args.baseline, args.source)
            src = work / "src"
            (src / "files").mkdir(parents=True)
            n = total // (64 << 10)
            for i in range(n):  # 64 KiB incompressible files, path-ordered in the data blob
                sub = src / "files" / f"d{i // 1000:03d}"
                sub.mkdir(exist_ok=True)
                (sub / f"f{i:06d}.bin").write_bytes(os.urandom(64 << 10))
            bm = [sys.executable, "-m", "blobmount.cli"]
            new_env = envs["new"]
            subprocess.run(
                [*bm, "create", str(src), str(work / "arc")], check=True, capture_output=True, env=new_env, cwd=work
            )
            shutil.rmtree(src)
            index_bytes = (work / "arc" / "index.blob").stat().st_size
            from tests.servers import SigningKey

            key = SigningKey.create(work / "key")
            networks = [("loopback", "127.0.0.1", False)]
            if not args.no_netshape:
                networks.append((f"netshape {args.delay_ms}ms {args.rate}", NS_IP, True))
            results: dict[str, object] = {}
            for network, ip, in_ns in networks:
                with netshape(args.delay_ms, args.rate) if in_ns else contextlib.nullcontext():
                    targets = _start_targets(work, network, ip, in_ns, key.cert, servers, bm, new_env)
                    for rep in range(reps):
                        version = {name: timed_cpu([*bm, "--version"], env) for name, env in envs.items()}
                        for target in targets:
                            for name, env in envs.items():
                                row = mount_once(target, env, work, f"{target.label} {name} {rep}")
                                row["version_s"], row["version_cpu_s"] = version[name]
                                target.rows.setdefault(name, []).append(row)
                    for target in targets:
                        results[target.label] = _summary(target, index_bytes)
                    for server in servers:
                        server.stop()
                    servers.clear()
            report["results"] = results
            report["load_end"] = loadavg()
            print(f"archive: {total >> 20} MiB data, {n} files of 64 KiB, index {index_bytes} bytes; {reps} reps")
            print(f"load at the end: {loadavg()}")
            if args.json:
                write_json(default_json_path("registry_ready") if args.json == AUTO_JSON else args.json, report)
    finally:
        for server in servers:
            server.stop()
        for mnt in work.glob("mnt-*"):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _start_targets(
    work: Path,
    network: str,
    ip: str,
    in_ns: bool,
    cert: Path,
    servers: list[Server],
    bm: list[str],
    env: dict[str, str],
) -> list[Target]:
    """The anonymous registry (archive pushed to it), then the bearer one on the same storage."""
    from tests.servers import free_port

    slug = "ns" if in_ns else "lo"
    ports = (5000, 5001, 5002) if in_ns else (free_port(), free_port(), free_port())
    storage = work / f"storage-{slug}"
    anon = start_registry(work / f"reg-{slug}-anon", storage, f"{ip}:{ports[0]}", in_ns, None)
    servers.append(anon)
    host = f"{ip}:{ports[0]}"
    subprocess.run(
        [*bm, "push", "--archive", str(work / "arc"), f"{host}/bench/assets:v1", "--plain-http", host],
        check=True,
        capture_output=True,
        env=env,
        cwd=work,
    )
    issuer = start_issuer(work / f"issuer-{slug}", work / "key", f"{ip}:{ports[1]}", in_ns)
    servers.append(issuer)
    token: dict[str, object] = {
        "token": {
            "realm": f"http://{ip}:{ports[1]}/token",
            "service": TOKEN_SERVICE,
            "issuer": ISSUER_NAME,
            "rootcertbundle": str(cert),
        }
    }
    bearer = start_registry(work / f"reg-{slug}-bearer", storage, f"{ip}:{ports[2]}", in_ns, token)
    servers.append(bearer)
    targets = [Target(network, "anonymous", host, anon), Target(network, "bearer", f"{ip}:{ports[2]}", bearer, issuer)]
    index = json.loads(
        subprocess.run(
            [
                "curl",
                "-s",
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
                f"http://{host}/v2/bench/assets/manifests/v1",
            ],
            capture_output=True,
            check=True,
        ).stdout
    )["layers"][0]["digest"]
    for target in targets:
        measure_link(target, f"http://{host}/v2/bench/assets/blobs/{index}")
    return targets


def _summary(target: Target, index_bytes: int) -> dict[str, object]:
    """Print one line per variant with the ratios to the target; return the JSON-able figures."""
    rtt = target.rtt_s
    limit = 5 * rtt + target.index_transfer_s + (2 * rtt if target.auth == "bearer" else 0)
    out: dict[str, object] = {
        "rtt_ms": rtt * 1e3,
        "index_transfer_ms": target.index_transfer_s * 1e3,
        "limit_ms": limit * 1e3,
    }
    rtts = "7 RTT" if target.auth == "bearer" else "5 RTT"
    print(
        f"{target.label}: RTT {rtt * 1e3:.2f} ms, index {index_bytes} B in {target.index_transfer_s * 1e3:.1f} ms;"
        f" target {rtts} + index = {limit * 1e3:.1f} ms"
    )
    for name, rows in target.rows.items():
        ready = statistics.median(r["mount_ready_s"] for r in rows)
        version = statistics.median(r["version_s"] for r in rows)
        ttfb = statistics.median(r["ttfb_s"] for r in rows)
        cpu = statistics.median(r["mount_cpu_s"] - r["version_cpu_s"] for r in rows)
        last = rows[-1]
        net = ready - version
        print(
            f"  {name:<22} mount-ready {ready * 1e3:6.0f} ms - --version {version * 1e3:3.0f} ms = {net * 1e3:5.0f} ms"
            f" = {net / limit:5.1f}x target (CPU {cpu * 1e3:3.0f} ms) | TTFB {ttfb * 1e3:5.1f} ms"
            f" | requests: mount {last['mount_requests']:.0f} ({last['mount_token_requests']:.0f} token,"
            f" {last['mount_401s']:.0f}x401), read {last['read_requests']:.0f} ({last['read_401s']:.0f}x401)"
            f" | bytes for the {last['file_bytes']:.0f}-byte file {last['read_bytes']:.0f}"
        )
        out[name] = {"reps": rows, "median_ready_minus_version_ms": net * 1e3, "ratio_to_target": net / limit}
    return out


if __name__ == "__main__":
    sys.exit(main())
