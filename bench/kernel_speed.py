"""Metadata and warm reads at kernel speed (issue 17): a walk, a read of every file and ``ls -l`` of a
30,000-file directory, each twice, through blobmount (a local archive), squashfuse_ll (a local
squashfs image) and plain files, interleaved in one run, with the FUSE requests blobmount took in
each phase (its ``blobmount_fuse_requests_total``).

    python -m bench.kernel_speed --prepare   # builds the data, outside the lock
    flock /tmp/bench.lock python -m bench.kernel_speed [--reps 3] [--generated] [--json [OUT]] [--md OUT]
        [--phases walk,read,ls] [--peers plain,squashfuse_ll,blobmount] [--before SRC] [--archive-key KEY]

Before/after pairs of a change: ``--before SRC`` adds the peer ``blobmount-before``, the blobmount
package found in SRC (e.g. ``git archive HEAD blobmount | tar -x -C SRC``) run by the same
interpreter, mounted and measured interleaved with the others; ``--archive-key`` mounts the archive
built by the package of that digest (an archive's bytes do not depend on the reader's code) instead
of building one for the sources checked out now.

Data: the ``drivers/net fs kernel include net Documentation`` subtrees of Debian's linux-source-6.1
(/usr/src/linux-source-*.tar.xz; issue 17's dataset, ~25,000 files / ~295 MB), else (or with
``--generated``) a generated tree of the same shape; archived with blobmount's default zstd and
squashed with ``-comp zstd``; plus ``many/``: 30,000 files of a few bytes in one directory, an
archive and an image of their own.

Per repetition each peer (in a rotated order) is mounted fresh (blobmount: an empty cache
directory) and runs, twice each: ``find ROOT -type f -printf '%s\\n'`` (walk), ``find ROOT -type f
-print0 | xargs -0 -P8 -n64 cat`` (read-all), ``ls -l many`` (ls). The first pass of each is the
first after the mount; the page cache is not dropped (a shared machine), so plain files' first pass
is warm as well: compare the second (warm) passes, and the request counts. Medians; ratios to
plain files. The load average is printed with every row. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._common import cleanup_on_term, code_state, loadavg, machine, median, write_json
from bench.datasets import extract_linux
from bench.janitor import Janitor, fresh_dir, unmount
from bench.peers import blobmount_cmd
from bench.servers import free_port

WORK_ROOT = Path(os.environ.get("BENCH_KSPEED_WORK_ROOT", "/var/tmp/blobmount-bench-kspeed"))
SUBTREES = ("drivers/net", "fs", "kernel", "include", "net", "Documentation")  # issue 17's dataset
MANY_FILES = 30_000  # the ls -l directory of issue 17
GENERATED_DIRS, GENERATED_FILES_PER_DIR = 1_000, 25  # the fallback tree: 25,000 files, ~12 KB each
MOUNT_WAIT_S = 60.0
RUN_TIMEOUT_S = 900.0
PHASES = ("walk", "read", "ls")
PASSES = ("first", "warm")
COMMANDS = {
    "walk": "find {root} -type f -printf '%s\\n'",
    "read": "find {root} -type f -print0 | xargs -0 -P8 -n64 cat",
    "ls": "ls -l {many}",
}
PEERS = ("plain", "squashfuse_ll", "blobmount")
START_POLL_S = 0.001  # how often a starting mount is looked for (the ready figure's resolution)
BEFORE = "blobmount-before"  # --before: the same archive through another checkout's package
REQUESTS = re.compile(r'^blobmount_fuse_requests_total\{op="(\w+)"\} (\S+)$', re.M)


def _linux_tarball() -> Path | None:
    found = sorted(Path("/usr/src").glob("linux-source-*.tar.xz"))
    return found[-1] if found else None


def _extract(tarball: Path, dest: Path) -> None:
    """The SUBTREES' regular files, one streaming pass over the tarball."""
    tmp = fresh_dir(dest.with_name(dest.name + ".tmp"))
    extract_linux(tarball, tmp, keep=lambda rel: any(rel.startswith(s + "/") for s in SUBTREES))
    tmp.rename(dest)


def _generate(dest: Path) -> None:
    tmp = fresh_dir(dest.with_name(dest.name + ".tmp"))
    for d in range(GENERATED_DIRS):
        sub = tmp / f"d{d // 50:02d}" / f"s{d:04d}"
        sub.mkdir(parents=True)
        for f in range(GENERATED_FILES_PER_DIR):
            line = f"/* {d}/{f} */ static int value_{d}_{f} = {d * f};\n".encode()
            (sub / f"f{f:02d}.c").write_bytes(line * (1 + (d * 31 + f * 17) % 400))
    tmp.rename(dest)


def _many(dest: Path) -> None:
    tmp = fresh_dir(dest.with_name(dest.name + ".tmp"))
    many = tmp / "many"
    many.mkdir()
    for i in range(MANY_FILES):
        (many / f"f{i:05d}.txt").write_bytes(f"{i}\n".encode())
    tmp.rename(dest)


def _small_file(root: Path) -> Path:
    """The file whose first byte is read right after each mount: the first, in path order, of
    1-16 KiB (a small file: its bytes are one chunk)."""
    for dirpath, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(dirpath) / name
            if 1024 <= path.lstat().st_size <= 16384:
                return path
    raise SystemExit(f"no file of 1-16 KiB under {root}")


def _tree_stats(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


def _build(name: str, src: Path, work: Path, log: Any, key: str | None = None) -> tuple[Path, Path]:
    """blobmount archive (default zstd) and squashfs image (-comp zstd) of `src`, kept across runs
    (keyed by the blobmount sources' digest for the archive: the writer may change; `key`: the
    archive an earlier package built, which must exist)."""
    if key is not None and not (work / f"{name}-archive-{key}").exists():
        raise SystemExit(f"--archive-key {key}: no {name} archive of that key in {work}")
    key = key or code_state()["package_sha256"]
    archive = work / f"{name}-archive-{key}"
    if not archive.exists():
        log(f"creating the blobmount archive of {name}")
        tmp = work / f"{name}-archive.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([*blobmount_cmd(), "create", str(src), str(tmp)], check=True, capture_output=True)
        tmp.rename(archive)
    image = work / f"{name}.squashfs"
    if not image.exists():
        log(f"creating the squashfs image of {name}")
        tmp_image = work / f"{name}.squashfs.tmp"
        subprocess.run(
            ["mksquashfs", str(src), str(tmp_image), "-comp", "zstd", "-noappend", "-quiet", "-no-progress"],
            check=True,
            capture_output=True,
        )
        tmp_image.rename(image)
    return archive, image


def _requests(url: str | None) -> dict[str, float]:
    if url is None:
        return {}
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:  # 127.0.0.1 only
        body = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in REQUESTS.finditer(body)}


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes], poll_s: float = 0.01) -> None:
    deadline = time.monotonic() + MOUNT_WAIT_S
    while time.monotonic() < deadline:
        if os.path.ismount(path):
            return
        if proc.poll() is not None:
            raise SystemExit(f"the daemon for {path} exited ({proc.returncode}) before mounting")
        time.sleep(poll_s)
    raise SystemExit(f"{path} not mounted within {MOUNT_WAIT_S:g} s")


class Peer:
    """One peer's two mounts (the tree and many/) for one repetition."""

    def __init__(
        self, kind: str, janitor: Janitor, work: Path, data: dict[str, Path], before: Path | None = None
    ) -> None:
        self.kind, self.janitor, self.work, self.data, self.before = kind, janitor, work, data, before
        self.procs: list[subprocess.Popen[bytes]] = []
        self.mounts: list[Path] = []
        self.url: str | None = None  # the tree mount's metrics
        self.many_url: str | None = None  # many/'s
        self.start: dict[str, float] = {}  # the tree mount's start-up (module docstring)

    def __enter__(self) -> tuple[Path, Path]:
        if self.kind == "plain":
            return self.data["tree"], self.data["many"] / "many"
        roots = []
        for name in ("tree", "many"):
            mnt = fresh_dir(self.work / "mnt" / name)
            if self.kind == "squashfuse_ll":
                cmd = ["squashfuse_ll", "-f", str(self.data[f"{name}-image"]), str(mnt)]
            else:
                port = free_port()
                cache = fresh_dir(self.work / "cache" / name)
                program = blobmount_cmd() if self.kind != BEFORE else [sys.executable, "-m", "blobmount.cli"]
                cmd = [*program, "mount", "-f", f"dir:{self.data[f'{name}-archive']}", str(mnt)]
                cmd += ["--cache-dir", str(cache), "--metrics", f"127.0.0.1:{port}"]
            # `python -m` puts its working directory first on sys.path: run the other package from its own
            env = None if self.kind != BEFORE else {**os.environ, "PYTHONPATH": str(self.before)}
            cwd = None if self.kind != BEFORE else self.before
            if env is not None and self.before is not None and name == "tree":
                _check_package(self.before, env)
            started = time.perf_counter()
            proc = self.janitor.spawn(cmd, log=self.work / f"{self.kind}-{name}.log", env=env, cwd=cwd)
            self.procs.append(proc)
            _wait_mounted(mnt, proc, poll_s=START_POLL_S)
            self.mounts.append(mnt)
            if name == "tree":  # ready: mounted and a stat answered; then one small file's first byte
                os.stat(mnt)
                ready = time.perf_counter()
                with open(mnt / self.data["small"].relative_to(self.data["tree"]), "rb") as f:
                    f.read(1)
                self.start = {"ready_s": ready - started, "first_byte_s": time.perf_counter() - ready}
                if self.kind.startswith("blobmount"):
                    version = time.perf_counter()
                    subprocess.run([*program, "--version"], env=env, cwd=cwd, check=True, capture_output=True)
                    self.start["version_s"] = time.perf_counter() - version
            if self.kind.startswith("blobmount"):
                url = f"http://127.0.0.1:{port}"
                deadline = time.monotonic() + MOUNT_WAIT_S
                while not _requests_ok(url) and time.monotonic() < deadline:
                    time.sleep(0.02)
                if name == "tree":
                    self.url = url
                else:
                    self.many_url = url
            roots.append(mnt)
        return roots[0], roots[1] / "many"

    def __exit__(self, *exc: object) -> None:
        for mnt in self.mounts:
            unmount(mnt)
        for proc in self.procs:
            self.janitor.wait_exit(proc, 20.0)


def _check_package(src: Path, env: dict[str, str]) -> None:
    """The --before daemon's interpreter, started as it is, imports the package in `src`."""
    done = subprocess.run(
        [sys.executable, "-c", "import blobmount; print(blobmount.__file__)"],
        env=env,
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    )
    if not Path(done.stdout.strip()).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"--before {src}: the daemon would import {done.stdout.strip()}")


def _requests_ok(url: str) -> bool:
    try:
        _requests(url)
    except OSError:
        return False
    return True


def _cpu_s(proc: subprocess.Popen[bytes] | None) -> float:
    """User + system CPU seconds `proc` has used so far (/proc/PID/stat), 0 without one."""
    if proc is None:
        return 0.0
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_phase(cmd: str) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL, timeout=RUN_TIMEOUT_S)
    return time.perf_counter() - started


def _one(peer: Peer, tree: Path, many: Path, phases: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for phase in phases:
        url = peer.many_url if phase == "ls" else peer.url
        daemon = (peer.procs[1] if phase == "ls" else peer.procs[0]) if peer.procs else None
        for pas in PASSES:
            before = _requests(url)
            cpu = _cpu_s(daemon)
            seconds = _run_phase(COMMANDS[phase].format(root=tree, many=many))
            cpu = _cpu_s(daemon) - cpu
            after = _requests(url)
            reqs = {op: int(n - before.get(op, 0)) for op, n in after.items() if n - before.get(op, 0)}
            out[f"{phase}/{pas}"] = {
                "s": seconds,
                "daemon_cpu_s": cpu if daemon is not None else None,
                "requests": reqs if peer.kind.startswith("blobmount") else None,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--generated", action="store_true", help="a generated tree even if linux-source is installed")
    ap.add_argument("--prepare", action="store_true", help="build the data (outside the bench lock) and exit")
    ap.add_argument("--json", nargs="?", const="-", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--phases", default=",".join(PHASES), help="a comma-separated subset of walk,read,ls")
    ap.add_argument("--peers", default=",".join(PEERS), help="a comma-separated subset of the peers")
    ap.add_argument("--before", type=Path, default=None, help="SRC holding another blobmount package (docstring)")
    ap.add_argument("--archive-key", default=None, help="mount the archives built by this package digest")
    args = ap.parse_args(argv)
    phases = tuple(p for p in PHASES if p in args.phases.split(","))
    peers = tuple(p for p in PEERS if p in args.peers.split(","))
    if args.before is not None:
        if not (args.before / "blobmount" / "cli" / "__init__.py").exists():
            raise SystemExit(f"--before {args.before}: no blobmount package there")
        peers += (BEFORE,)
    if not phases or not peers:
        raise SystemExit("--phases and --peers must name at least one of theirs")
    log = print
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    janitor = Janitor(WORK_ROOT)
    for line in janitor.recover(None):
        log(line)
    tarball = None if args.generated else _linux_tarball()
    name = f"linux-{tarball.name.removesuffix('.tar.xz')}" if tarball else "generated"
    tree = WORK_ROOT / f"tree-{name}"
    if not tree.exists():
        log(f"building the tree {tree} from {tarball or 'a generator'}")
        if tarball is not None:
            _extract(tarball, tree)
        else:
            _generate(tree)
    many = WORK_ROOT / "many"
    if not many.exists():
        _many(many)
    data = {"tree": tree, "many": many, "small": _small_file(tree)}
    data["tree-archive"], data["tree-image"] = _build("tree", tree, WORK_ROOT, log, args.archive_key)
    data["many-archive"], data["many-image"] = _build("many", many, WORK_ROOT, log, args.archive_key)
    if args.prepare:
        return 0
    files, size = _tree_stats(tree)
    info, machine_line = machine()
    header = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "code": code_state(),
        "machine": info,
        "dataset": f"{name}: {' '.join(SUBTREES) if tarball else 'generated'}; {files} files, {size} bytes",
        "many": f"{MANY_FILES} files in one directory",
        "squashfuse_ll": subprocess.run(["dpkg-query", "-W", "squashfuse"], capture_output=True, text=True).stdout,
        "load_start": loadavg(),
        "reps": args.reps,
        "phases": phases,
        "peers": peers,
        "before": None if args.before is None else str(args.before),
        "archive": data["tree-archive"].name,
    }
    log(f"# kernel speed, {header['date']}, commit {header['code']['head']} {header['code']['dirty']}")
    log(machine_line)
    log(f"dataset: {header['dataset']}; many/: {header['many']}; load {header['load_start']}")
    runs: list[dict[str, Any]] = []
    with cleanup_on_term():
        try:
            for rep in range(args.reps):
                order = peers[rep % len(peers) :] + peers[: rep % len(peers)]
                for kind in order:
                    peer = Peer(kind, janitor, WORK_ROOT, data, args.before)
                    with peer as (root, many_dir):
                        result = _one(peer, root, many_dir, phases)
                    load = loadavg()
                    runs.append({"rep": rep, "peer": kind, "load": load, "phases": result, "start": peer.start})
                    figures = "  ".join(f"{k} {v['s']:.3f}s" for k, v in result.items())
                    log(f"rep {rep} {kind:14s} load {load}: {figures}")
        finally:
            janitor.stop_all()
    header["load_end"] = loadavg()
    table = _table(runs, phases, peers) + "\n\n" + _start_table(runs, peers)
    log(table)
    doc: dict[str, object] = {"header": header, "commands": COMMANDS, "runs": runs}
    if args.json is not None:
        path = args.json
        if str(path) == "-":
            path = Path("bench/results") / f"{datetime.date.today()}-kernel-speed.json"
        write_json(path, doc)
    if args.md is not None:
        args.md.write_text(_markdown(header, table))
        log(f"wrote {args.md}")
    return 0


def _table(runs: list[dict[str, Any]], phases: tuple[str, ...] = PHASES, peers: tuple[str, ...] = PEERS) -> str:
    """Medians per peer, ratios to plain files (else to the first peer), the CPU time of each
    mounting daemon in the phase (its /proc stat: less swayed by other work on the machine than
    the wall clock), the requests of each blobmount peer; with --before, also the median of the
    same repetitions' after/before ratios."""
    base = "plain" if "plain" in peers else peers[0]
    ours = [p for p in peers if p.startswith("blobmount")]
    head = ["phase", *peers, *[f"{p} / {base}" for p in peers if p != base]]
    if BEFORE in peers and "blobmount" in peers:
        head.append("blobmount / blobmount-before, wall (median of same-rep ratios)")
        head.append("blobmount / blobmount-before, daemon CPU (same)")
    mounted = [p for p in peers if p != "plain"]
    head += [f"{p} daemon CPU" for p in mounted]
    head += [f"{p} FUSE requests (median; kinds of the last run)" for p in ours]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for phase in phases:
        for pas in PASSES:
            key = f"{phase}/{pas}"
            med = {p: median([r["phases"][key]["s"] for r in runs if r["peer"] == p]) for p in peers}
            row = [f"{phase} ({pas})", *[f"{med[p]:.3f} s" for p in peers]]
            row += [f"{med[p] / med[base]:.2f}x" for p in peers if p != base]
            if BEFORE in peers and "blobmount" in peers:
                reps = sorted({r["rep"] for r in runs})
                for what in ("s", "daemon_cpu_s"):
                    per_rep = {(r["rep"], r["peer"]): r["phases"][key][what] for r in runs}
                    pairs = [per_rep[(i, "blobmount")] / max(per_rep[(i, BEFORE)], 1e-9) for i in reps]
                    row.append(f"{median(pairs):.2f}x ({', '.join(f'{x:.2f}' for x in pairs)})")
            for p in mounted:
                row.append(
                    f"{median([r['phases'][key].get('daemon_cpu_s') or 0.0 for r in runs if r['peer'] == p]):.3f} s"
                )
            for p in ours:
                counts = [r["phases"][key]["requests"] for r in runs if r["peer"] == p]
                kinds = ", ".join(f"{op} {n}" for op, n in sorted(counts[-1].items()))
                row.append(f"{median([sum(c.values()) for c in counts]):g} ({kinds})")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _start_table(runs: list[dict[str, Any]], peers: tuple[str, ...]) -> str:
    """Start-up of the tree mount, medians: spawn to mounted-and-stat-answered (polled every
    START_POLL_S; foreground mounts, so no daemonizing), then one small file's first byte, and
    blobmount's own ``--version`` (the interpreter's and the CLI's start) in the same repetition."""
    lines = [
        "| peer | mount ready | first byte of a small file after ready | `--version` | ready - `--version` |",
        "|---|---|---|---|---|",
    ]
    for p in peers:
        starts = [r["start"] for r in runs if r["peer"] == p and r.get("start")]
        if not starts:
            continue
        ready = median([x["ready_s"] for x in starts])
        first = median([x["first_byte_s"] for x in starts])
        versions = [x["version_s"] for x in starts if "version_s" in x]
        version = f"{median(versions) * 1e3:.0f} ms" if versions else "-"
        gap = f"{median([x['ready_s'] - x['version_s'] for x in starts]) * 1e3:.0f} ms" if versions else "-"
        lines.append(f"| {p} | {ready * 1e3:.0f} ms | {first * 1e3:.1f} ms | {version} | {gap} |")
    return "\n".join(lines)


def _markdown(header: dict[str, Any], table: str) -> str:
    code = header["code"]
    return (
        f"# Kernel speed (issue 17): walk, read-all, ls -l; {header['date']}\n\n"
        f"`flock /tmp/bench.lock python -m bench.kernel_speed --reps {header['reps']}"
        f" --phases {','.join(header['phases'])} --peers {','.join(p for p in header['peers'] if p != BEFORE)}"
        f"{'' if header['before'] is None else ' --before ' + header['before']}`"
        f" at commit {code['head']} {code['dirty']} (package {code['package_sha256']}).\n\n"
        f"Machine: {json.dumps(header['machine'])}. Load average at the start {header['load_start']},"
        f" at the end {header['load_end']} (every row's load is in the JSON).\n\n"
        f"Dataset: {header['dataset']}; ls -l on {header['many']}. squashfuse: {header['squashfuse_ll'].strip()}.\n\n"
        "Commands: walk `find ROOT -type f -printf '%s\\n'`; read `find ROOT -type f -print0 | xargs -0 -P8"
        ' -n64 cat`; ls `ls -l many`. "first" is the first pass after a fresh mount (blobmount: empty cache'
        " directory); the page cache is not dropped, so plain files' first pass is warm too.\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
