"""Prefetch profiles, measured: two workloads on a fresh cache with and without the profile they
recorded, against their warm time, through the shaped namespace (10 ms, 1 Gbit) or loopback.

    python -m bench.profile_prefetch [--network netns|loopback] [--delay-ms 10] [--rate 1gbit] [--json [PATH]]

The tree (built once into bench/.cache/profile-tree-<key>/, from this machine's own files):
- ``py/``: the packages of this venv's site-packages (blobmount's dependencies, hypothesis, pytest...;
  not mypy, ruff or pip) with their bytecode; the ``import`` workload imports every module of them
  (``pkgutil.walk_packages``), each in order, failures ignored;
- ``repo/``: a git repository whose history is 4,000 commits adding and editing files of this
  Python's standard library (``git fast-import``, then packed); the ``gitlog`` workload is ``git -C
  MNT/repo log --stat``.

Per workload, each phase on its own mount, with the page cache dropped first:
1. ``cold``: fresh cache, no profile, ``--record-profile``; the profile is saved (`profile save`) and
   pushed (`profile push`) as a referrer of the archive;
2. ``warm``: the same cache, full, remounted;
3. ``profile``: a fresh cache, ``--prefetch-profile auto``; the workload starts as soon as the mount is
   ready (the prefetch runs beside it);
4. ``profile_then_run``: the same, but the workload starts once the prefetch has finished (``wait_s``:
   from READY to the prefetch's log line), separating the prefetch's cost from its interference.
Bytes are counted at the registry's access log (the mount's whole life, the profile's look-up
included). The checks the issue sets: profile time <= warm + profile bytes / link rate + 3 RTT;
cold / profile >= 3; profile bytes <= 1.2 x cold bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import servers
from bench._common import code_state, default_json_path, drop_caches, loadavg, machine, write_json
from bench.janitor import Janitor, fresh_dir, unmount
from bench.peers import blobmount_cmd
from bench.servers import NS_IP, NS_REGISTRY_PORT, Netshape, free_port, rtt_s, start_registry

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache"
WORK = Path(os.environ.get("BENCH_WORK_ROOT", "/var/tmp/blobmount-bench-profiles"))
COMMITS = 4000
FILES_PER_COMMIT = 4
SKIP_PACKAGES = ("mypy", "mypyc", "ruff", "pip", "setuptools", "_distutils_hack", "blobmount", "__editable__")
RUN_TIMEOUT_S = 600.0
MOUNT_WAIT_S = 60.0
PREFETCH_WAIT_S = 300.0
WORKLOADS = ("import", "gitlog")
IMPORT_CODE = """
import importlib, pkgutil, sys, warnings
warnings.simplefilter("ignore")
root = sys.argv[1]
sys.path.insert(0, root)
count = 0
for info in pkgutil.walk_packages([root], onerror=lambda name: None):
    if "test" in info.name or info.name.startswith("_"):
        continue
    try:
        importlib.import_module(info.name)
        count += 1
    except BaseException:
        pass
print(count)
"""


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(cmd, capture_output=True, timeout=RUN_TIMEOUT_S, check=False, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.decode(errors='replace')[-800:]}")
    return done


def _history(repo: Path) -> None:
    """COMMITS commits of stdlib files, some edited later, through one `git fast-import` stream."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.parts and p.stat().st_size < 200_000)
    _run(["git", "init", "-q", "-b", "main", str(repo)])
    out = bytearray()
    when = 1_700_000_000
    for n in range(COMMITS):
        out += b"commit refs/heads/main\n"
        out += f"committer bench <bench@localhost> {when + n * 60} +0000\n".encode()
        msg = f"commit {n}\n".encode()
        out += b"data %d\n%s" % (len(msg), msg)  # each commit continues the branch's last one
        for k in range(FILES_PER_COMMIT):
            src = files[(n * FILES_PER_COMMIT + k) % len(files)]
            body = src.read_bytes()
            if n * FILES_PER_COMMIT + k >= len(files):  # a second round: edit what is there
                body += f"\n# edit {n}\n".encode()
            rel = src.relative_to(stdlib).as_posix().encode()
            out += b"M 100644 inline %s\ndata %d\n%s\n" % (rel, len(body), body)
    _run(["git", "-C", str(repo), "fast-import", "--quiet"], input=bytes(out))
    _run(["git", "-C", str(repo), "-c", "gc.packRefs=false", "gc", "-q"])
    _run(["git", "-C", str(repo), "checkout", "-q", "main"])


def _packages(dest: Path) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir(parents=True)
    for top in sorted(site.iterdir()):
        if top.name.endswith((".dist-info", ".pth")) or top.name.startswith(SKIP_PACKAGES):
            continue
        if top.is_dir():
            shutil.copytree(top, dest / top.name, ignore=shutil.ignore_patterns("__pycache__", "tests", "test"))
        elif top.suffix in (".py", ".so"):
            shutil.copy2(top, dest / top.name)
    _run([sys.executable, "-m", "compileall", "-q", str(dest)])


def dataset() -> tuple[Path, Path]:
    """(tree, archive directory), built when absent."""
    key = f"{COMMITS}-{FILES_PER_COMMIT}-{sys.version_info.major}{sys.version_info.minor}"
    base = CACHE / f"profile-tree-{key}"
    tree, archive = base / "tree", base / "archive"
    if not (archive / "data.blob").exists():
        print(f"building {base} (once)", flush=True)
        shutil.rmtree(base, ignore_errors=True)
        _packages(tree / "py")
        _history(tree / "repo")
        _run([*blobmount_cmd(), "create", str(tree), str(archive)])
    return tree, archive


def workload(name: str, root: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the workload's own process: user + system)."""
    if name == "import":
        cmd = [sys.executable, "-S", "-c", IMPORT_CODE, str(root / "py")]
    else:
        cmd = ["git", "-c", "safe.directory=*", "-C", str(root / "repo"), "log", "--stat"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    _run(cmd, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


class Bench:
    def __init__(self, janitor: Janitor, registry: servers.Server, ref: str, plain: list[str]) -> None:
        self.janitor = janitor
        self.registry = registry
        self.ref = ref
        self.plain = plain
        self.mnt = WORK / "mnt"
        self.count = 0

    @contextlib.contextmanager
    def mount(self, cache: Path, *flags: str) -> Iterator[Path]:
        """A foreground daemon at self.mnt, ready; always unmounted. Yields its log."""
        self.mnt.mkdir(parents=True, exist_ok=True)
        if os.path.ismount(self.mnt):
            unmount(self.mnt)
        self.count += 1
        log = WORK / f"mount-{self.count:02d}.log"
        cmd = [*blobmount_cmd(), "mount", "-f", self.ref, str(self.mnt), "--cache-dir", str(cache), *self.plain]
        proc = self.janitor.spawn([*cmd, "-v", *flags], log)
        try:
            deadline = time.monotonic() + MOUNT_WAIT_S
            while not os.path.ismount(self.mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mount failed:\n{log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.01)
            os.stat(self.mnt)
            yield log
        finally:
            if os.path.ismount(self.mnt):
                unmount(self.mnt)
            self.janitor.wait_exit(proc, 20.0)

    def run(
        self, wl: str, cache: Path, *flags: str, wait_for: str | None = None, first: bool = False
    ) -> dict[str, Any]:
        """One mount, one workload. `wait_for`: a log line to wait for (the prefetch's summary),
        after the workload, or before it when `first` (then ``wait_s`` is how long it took)."""
        drop_caches()
        mark = self.registry.log.mark()
        with self.mount(cache, *flags) as log:
            started = time.perf_counter()
            line = _wait_line(log, wait_for) if wait_for is not None and first else None
            waited = time.perf_counter() - started
            seconds, cpu = workload(wl, self.mnt)
            if wait_for is not None and not first:
                line = _wait_line(log, wait_for)
            traffic = self.registry.log.since(mark)
        out = {"seconds": seconds, "cpu_s": cpu, "bytes": traffic.bytes, "requests": traffic.requests, "log": line}
        if first:
            out["wait_s"] = waited
        return out


def _wait_line(log: Path, needle: str) -> str | None:
    deadline = time.monotonic() + PREFETCH_WAIT_S
    while time.monotonic() < deadline:
        line = next((x for x in log.read_text(errors="replace").splitlines() if needle in x), None)
        if line is not None:
            return line
        time.sleep(0.02)
    return None


def measure(bench: Bench, wl: str) -> dict[str, Any]:
    caches = WORK / "cache"
    cold_cache = fresh_dir(caches / f"{wl}-cold")
    saved = WORK / f"{wl}-profile.json"
    drop_caches()
    mark = bench.registry.log.mark()
    with bench.mount(cold_cache, "--record-profile", "--record-seconds", "3600"):
        cold_s, cold_cpu = workload(wl, bench.mnt)
        _run([*blobmount_cmd(), "profile", "save", str(bench.mnt), str(saved)])
        cold_traffic = bench.registry.log.since(mark)
    cold = {"seconds": cold_s, "cpu_s": cold_cpu, "bytes": cold_traffic.bytes, "requests": cold_traffic.requests}
    _run([*blobmount_cmd(), "profile", "push", bench.ref, str(saved), *bench.plain])
    warm = bench.run(wl, cold_cache)
    prof = bench.run(wl, fresh_dir(caches / f"{wl}-profile"), "--prefetch-profile", "auto", wait_for="entries used")
    line = prof.pop("log") or ""
    warm.pop("log")
    # the same, the workload started only once the prefetch is done: what the prefetch alone costs
    after = bench.run(wl, fresh_dir(caches / f"{wl}-after"), "--prefetch-profile", "auto", wait_for="entries used",
                      first=True)  # fmt: skip
    after.pop("log")
    m = re.search(r"(\d+) bytes fetched in (\d+) requests", line)
    prof["profile_bytes"] = int(m.group(1)) if m else None
    prof["prefetch_requests"] = int(m.group(2)) if m else None
    prof["profile_entries"] = len(json.loads(saved.read_bytes())["entries"])
    return {"cold": cold, "warm": warm, "profile": prof, "profile_then_run": after, "prefetch_log": line}


def rate_bytes_s(rate: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not m:
        raise SystemExit(f"--rate {rate}: expected e.g. 1gbit")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8


def checks(result: dict[str, Any], rate: float, rtt: float) -> dict[str, Any]:
    cold, warm, prof = result["cold"], result["warm"], result["profile"]
    bound = warm["seconds"] + (prof["profile_bytes"] or 0) / rate + 3 * rtt
    return {
        "warm_at_least_1s": warm["seconds"] >= 1.0,
        "time_bound_s": round(bound, 3),
        "time_within_bound": prof["seconds"] <= bound,
        "speedup_vs_cold": round(cold["seconds"] / prof["seconds"], 2),
        "speedup_at_least_3x": cold["seconds"] >= 3 * prof["seconds"],
        "bytes_ratio_vs_cold": round(prof["bytes"] / cold["bytes"], 3) if cold["bytes"] else None,
        "bytes_within_1_2x": prof["bytes"] <= 1.2 * cold["bytes"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_prefetch", description=__doc__.split("\n")[0])
    ap.add_argument("--network", choices=("netns", "loopback"), default="netns")
    ap.add_argument("--delay-ms", type=int, default=10)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--lock-wait-s", type=float, default=600.0, help="wait this long for the netshape lock")
    ap.add_argument("--json", nargs="?", const="", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (drop_caches, mounts, the network namespace)")
    servers.LOCK_WAIT_S = args.lock_wait_s
    tree, archive = dataset()
    WORK.mkdir(parents=True, exist_ok=True)
    janitor = Janitor(WORK)
    for line in janitor.recover(None):
        print(line)
    storage = fresh_dir(WORK / "storage")
    results: dict[str, Any] = {}
    try:
        loop = start_registry(janitor, WORK, storage, "127.0.0.1", free_port(), netns=False)
        repo_ref = "bench/profile-tree:v1"
        _run([*blobmount_cmd(), "push", "--archive", str(archive), f"{loop.addr}/{repo_ref}"])
        shape = Netshape(janitor, args.delay_ms, args.rate) if args.network == "netns" else contextlib.nullcontext()
        with shape:
            if args.network == "netns":
                registry = start_registry(janitor, WORK, storage, NS_IP, NS_REGISTRY_PORT, netns=True)
                plain = ["--plain-http", registry.addr]
            else:
                registry, plain = loop, []
            rtt = rtt_s(registry.host, registry.port, "/v2/")
            print(f"{args.network}: RTT {rtt * 1e3:.2f} ms, load {loadavg()}", flush=True)
            bench = Bench(janitor, registry, f"{registry.addr}/{repo_ref}", plain)
            for wl in WORKLOADS:
                result = measure(bench, wl)
                result["checks"] = checks(result, rate_bytes_s(args.rate), rtt)
                results[wl] = result
                c, w, p, a = result["cold"], result["warm"], result["profile"], result["profile_then_run"]
                print(
                    f"{wl}: cold {c['seconds']:.2f} s (cpu {c['cpu_s']:.2f}) {c['bytes'] >> 20} MiB | warm "
                    f"{w['seconds']:.2f} s (cpu {w['cpu_s']:.2f}) | profile {p['seconds']:.2f} s (cpu {p['cpu_s']:.2f})"
                    f" {p['bytes'] >> 20} MiB ({p['prefetch_requests']} prefetch requests, "
                    f"{p['profile_entries']} entries) | prefetch first: {a['wait_s']:.2f} s, then {a['seconds']:.2f} s"
                    f" | {json.dumps(result['checks'])}",
                    flush=True,
                )
    finally:
        janitor.stop_all()
        if os.path.ismount(WORK / "mnt"):
            unmount(WORK / "mnt")
    info, line = machine()
    print(line)
    if args.json is not None:
        doc = {
            "benchmark": "profile_prefetch",
            "network": args.network,
            "delay_ms": args.delay_ms if args.network == "netns" else 0,
            "rate": args.rate if args.network == "netns" else None,
            "machine": info,
            "code": code_state(),
            "load": loadavg(),
            "tree": str(tree),
            "results": results,
        }
        write_json(Path(args.json) if args.json else default_json_path("profile_prefetch"), doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
