"""Bytes at link speed: a large raw file read cold from a loopback registry, beside the same work
done in C against the same server, one run (issue "Bytes at link speed").

    python -m bench.link_speed [--reps 5] [--size 1G] [--par-size 128M] [--rand 2000]
                               [--only seq,par8,remount,rand4k] [--json [OUT]]

One archive, pushed raw (``create --compression none``) to a docker-registry on 127.0.0.1:
``big.bin`` (random bytes, ``--size``) and ``par/p0.bin`` ... ``par/p7.bin`` (``--par-size`` each).
Every trial of ours uses a fresh mount and an empty cache directory; the reader is ``dd bs=1M`` to
/dev/null (blobmount itself checks the sha256 of every byte it serves, lazily).

- ``seq``: ours, cold ``dd`` of big.bin; the peer, ``curl -s -o FILE -r SPAN URL && openssl dgst
  -sha256 FILE`` with FILE beside the cache directory (fetch, keep a copy, hash it: what blobmount
  does), and httpfs2 mounted on the data blob's URL, ``dd`` of big.bin's span. CPU per GiB of
  the daemon (all its threads, from /proc; it starts no processes) and of the peer's processes.
- ``par8``: 8 ``dd`` of the 8 par files at once through one fresh mount, beside 8 such peers at once.
- ``remount``: ``dd`` of big.bin after a remount over the cache the cold read filled, beside a mount
  of the local archive directory (page cache not dropped for either: a shared machine).
- ``rand4k``: ``--rand`` preads of 4 KiB at seeded random 4 KiB-aligned offsets of big.bin (QD1),
  cold, beside one curl run fetching the same ranges over one keep-alive connection (``--next``);
  with bytes fetched (the daemon's ``blobmount_fetch_bytes_total``) per byte read.
- ``rclone-seq`` and ``rclone-rand4k``: the same reads through ``rclone mount --vfs-cache-mode full``
  (cold cache) of big.bin served by nginx on loopback (rclone's http backend needs a directory
  listing, which a registry's blob URL does not give; nginx serves the same bytes).

Repetitions alternate the order of ours and the peer's; ratios are taken per pair, then the
median. Targets printed beside the figures, never asserted. The load average is printed with every
row: on a loaded machine compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import cleanup_on_term, code_state, default_json_path, loadavg, machine, median, write_json
from bench.janitor import Janitor, fresh_dir, unmount
from bench.peers import blobmount_cmd
from bench.servers import Server, free_port, start_nginx, start_registry
from bench.zstd_stream import children_cpu, data_digest, parse_size, proc_cpu, spans

WORK_ROOT = Path(os.environ.get("BENCH_LINK_WORK_ROOT", "/var/tmp/blobmount-bench-link"))
AUTO_JSON = Path("-")
REPO = "bench/link-speed"
MOUNT_WAIT_S = 60.0
RUN_TIMEOUT_S = 900.0
PAR = 8
WORKLOADS = ("seq", "par8", "remount", "rand4k")
TARGETS = {
    "seq": 1.0,
    "httpfs2": 1.0,
    "rclone-seq": 1.0,
    "par8": 0.8,
    "remount": 0.9,
    "rand4k": 0.9,
    "rclone-rand4k": 1.0,
}
FETCHED = re.compile(r"^blobmount_fetch_bytes_total (\S+)$", re.M)


def ensure_archive(work: Path, size: int, par_size: int) -> Path:
    """The raw archive (kept between runs with the same sizes)."""
    out = work / f"archive-{size >> 20}M-{PAR}x{par_size >> 20}M"
    if (out / "index.blob").exists():
        return out
    src = work / "src"
    fresh_dir(src)
    (src / "par").mkdir()
    files = [(src / "big.bin", size)] + [(src / "par" / f"p{i}.bin", par_size) for i in range(PAR)]
    for seed, (path, length) in enumerate(files):
        rng = random.Random(seed)
        with open(path, "wb") as f:
            left = length
            while left:
                n = min(left, 8 << 20)
                f.write(rng.randbytes(n))
                left -= n
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [*blobmount_cmd(), "create", str(src), str(tmp), "--compression", "none", "--no-progress"]
    subprocess.run(cmd, check=True, timeout=RUN_TIMEOUT_S)
    tmp.rename(out)
    shutil.rmtree(src, ignore_errors=True)
    return out


class Mount:
    """``blobmount mount -f`` with its metrics on a free loopback port; always taken down."""

    def __init__(
        self, janitor: Janitor, work: Path, source: str, cache: Path, n: int, env: dict[str, str] | None = None
    ) -> None:
        self.janitor, self.source, self.cache, self.n, self.env = janitor, source, cache, n, env
        self.mnt = work / f"mnt-{n}"
        self.log = work / f"mount-{n}.log"
        self.port = free_port()

    def __enter__(self) -> Mount:
        fresh_dir(self.mnt)
        cmd = [*blobmount_cmd(), "mount", "-f", self.source, str(self.mnt), "--cache-dir", str(self.cache)]
        cmd += ["--metrics", f"127.0.0.1:{self.port}", *os.environ.get("BENCH_MOUNT_ARGS", "").split()]
        self.proc = self.janitor.spawn(cmd, self.log, env=self.env)
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.janitor.stop(self.proc)
                raise SystemExit(f"mount failed: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        self.spy: subprocess.Popen[bytes] | None = None
        if spy_dir := os.environ.get("BENCH_LINK_PYSPY"):
            # BENCH_LINK_PYSPY=DIR: py-spy samples this daemon (every thread, idle left out) into
            # DIR/mount-N.txt, collapsed stacks; a profile, not a timing (it costs the daemon CPU)
            spy = Path(sys.executable).with_name("py-spy")
            out = Path(spy_dir) / f"mount-{self.n}.txt"
            cmd = [str(spy), "record", "--pid", str(self.proc.pid), "--threads", "--format", "raw", "-o", str(out)]
            self.spy = self.janitor.spawn(cmd, self.log.with_suffix(".spy.log"))
            time.sleep(1.0)  # attached
        return self

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as response:
            return str(response.read().decode())  # 127.0.0.1 only

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def fetched(self) -> float:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:  # 127.0.0.1 only
            m = FETCHED.search(response.read().decode())
        return float(m.group(1)) if m else 0.0

    def __exit__(self, *exc: object) -> None:
        if self.spy is not None:
            self.janitor.stop(self.spy, first=signal.SIGINT)  # py-spy writes its file on SIGINT
        if os.path.ismount(self.mnt):
            unmount(self.mnt)
        self.janitor.wait_exit(self.proc, 30.0)


def dd(path: Path, skip_mib: int = 0, count_mib: int | None = None) -> list[str]:
    cmd = ["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"]
    if skip_mib:
        cmd.append(f"skip={skip_mib}")
    if count_mib is not None:
        cmd.append(f"count={count_mib}")
    return cmd


def run_timed(cmds: list[list[str]] | str, shell: bool = False) -> tuple[float, float, list[bytes]]:
    """Wall and children's CPU seconds of the commands, run at once; their outputs."""
    c = children_cpu()
    t = time.perf_counter()
    if isinstance(cmds, str):
        outs = [subprocess.run(cmds, shell=True, check=True, capture_output=True, timeout=RUN_TIMEOUT_S).stdout]
    else:
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE) for cmd in cmds]
        outs = [p.communicate(timeout=RUN_TIMEOUT_S)[0] for p in procs]
        for cmd, p in zip(cmds, procs, strict=True):
            if p.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}")
    return time.perf_counter() - t, children_cpu() - c, outs


class Bench:
    def __init__(self, janitor: Janitor, work: Path, archive: Path, ref: str, blob_url: str) -> None:
        self.janitor, self.work, self.archive, self.ref, self.url = janitor, work, archive, ref, blob_url
        self.where = spans(archive)
        self.n = 0
        self.nginx: Server | None = None
        self.env: dict[str, str] | None = None  # the daemon's environment (--against)

    def against(self, code: Path, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
        """`fn` with the daemon imported from `code` (a checkout of another commit) instead."""
        self.env = os.environ | {"PYTHONPATH": str(code)}
        try:
            return fn()
        finally:
            self.env = None

    def rclone(self, run: Callable[[Path], dict[str, float]]) -> dict[str, float]:
        """`run` on big.bin through a fresh rclone mount (full VFS cache, empty) of nginx's copy."""
        if self.nginx is None:
            www = fresh_dir(self.work / "www")
            offset, size, _ = self.where[b"big.bin"]
            with open(self.archive / "data.blob", "rb") as src, open(www / "big.bin", "wb") as dst:
                src.seek(offset)
                dst.write(src.read(size))
            self.nginx = start_nginx(self.janitor, self.work, www, "127.0.0.1", free_port(), netns=False)
        self.n += 1
        mnt, cache = fresh_dir(self.work / f"mnt-rclone-{self.n}"), fresh_dir(self.work / f"cache-rclone-{self.n}")
        (self.work / "rclone.conf").touch()
        cmd = ["rclone", "mount", ":http:", str(mnt), "--http-url", f"http://{self.nginx.addr}/", "--read-only"]
        cmd += ["--vfs-cache-mode", "full", "--cache-dir", str(cache), "--config", str(self.work / "rclone.conf")]
        proc = self.janitor.spawn(cmd, self.work / f"rclone-{self.n}.log")
        try:
            deadline = time.monotonic() + MOUNT_WAIT_S
            while not os.path.ismount(mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("rclone did not mount")
                time.sleep(0.02)
            c0 = proc_cpu(proc.pid)
            out = run(mnt / "big.bin")
            return out | {"cpu": proc_cpu(proc.pid) - c0}
        finally:
            if os.path.ismount(mnt):
                unmount(mnt)
            self.janitor.wait_exit(proc, 30.0)
            shutil.rmtree(cache, ignore_errors=True)

    def mount(self, source: str | None = None, cache: Path | None = None) -> Mount:
        self.n += 1
        if cache is None:
            cache = fresh_dir(self.work / f"cache-{self.n}")
        return Mount(self.janitor, self.work, source or self.ref, cache, self.n, self.env)

    def _peer_cmd(self, name: str, out: Path) -> str:
        offset, size, _ = self.where[name.encode()]
        return f"curl -sf -o {out} -r {offset}-{offset + size - 1} {self.url} && openssl dgst -sha256 -r {out}"

    def _check(self, out: bytes, name: str) -> None:
        want = self.where[name.encode()][2]
        if out.split()[0].decode() != want:
            raise SystemExit(f"peer: wrong sha256 for {name}")

    def seq(self) -> dict[str, float]:
        """Cold, into cache-seq (which remount() reads back)."""
        cache = fresh_dir(self.work / "cache-seq")
        with self.mount(cache=cache) as m:
            c0 = m.cpu()
            took, reader_cpu, _ = run_timed([dd(m.mnt / "big.bin")])
            return {"s": took, "cpu": m.cpu() - c0, "reader_cpu": reader_cpu, "fetched": m.fetched()}

    def peer_seq(self) -> dict[str, float]:
        out = self.work / "peer-big.bin"
        took, cpu, outs = run_timed(self._peer_cmd("big.bin", out), shell=True)
        self._check(outs[0], "big.bin")
        out.unlink()
        return {"s": took, "cpu": cpu}

    def httpfs2(self) -> dict[str, float]:
        offset, size, _ = self.where[b"big.bin"]
        mnt = fresh_dir(self.work / "mnt-httpfs2")
        proc = self.janitor.spawn(["httpfs2", "-f", self.url, str(mnt)], self.work / "httpfs2.log")
        try:
            deadline = time.monotonic() + MOUNT_WAIT_S
            while not os.path.ismount(mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("httpfs2 did not mount")
                time.sleep(0.02)
            blob = next(mnt.iterdir())
            c0 = proc_cpu(proc.pid)
            took, _, _ = run_timed([dd(blob, offset >> 20, size >> 20)])
            return {"s": took, "cpu": proc_cpu(proc.pid) - c0}
        finally:
            if os.path.ismount(mnt):
                unmount(mnt)
            self.janitor.wait_exit(proc, 30.0)

    def par8(self) -> dict[str, float]:
        with self.mount() as m:
            c0 = m.cpu()
            took, _, _ = run_timed([dd(m.mnt / "par" / f"p{i}.bin") for i in range(PAR)])
            cpu = m.cpu() - c0
            text = m.metrics()
            requests = re.search(r"^blobmount_fetch_requests_total (\S+)$", text, re.M)
            reads = re.search(r'^blobmount_fuse_requests_total\{op="read"\} (\S+)$', text, re.M)
            return {
                "s": took,
                "cpu": cpu,
                "requests": float(requests.group(1)) if requests else 0.0,
                "fuse_reads": float(reads.group(1)) if reads else 0.0,
            }

    def peer_par8(self) -> dict[str, float]:
        outs = [self.work / f"peer-p{i}.bin" for i in range(PAR)]
        script = " & ".join(f"({self._peer_cmd(f'par/p{i}.bin', out)})" for i, out in enumerate(outs)) + " & wait"
        took, cpu, _ = run_timed(script, shell=True)
        for i, out in enumerate(outs):
            digest = subprocess.run(["openssl", "dgst", "-sha256", "-r", str(out)], capture_output=True, check=True)
            self._check(digest.stdout, f"par/p{i}.bin")
            out.unlink()
        return {"s": took, "cpu": cpu}

    def remount(self) -> dict[str, float]:
        """After seq(): a mount over the cache it filled."""
        with self.mount(cache=self.work / "cache-seq") as m:
            took, _, _ = run_timed([dd(m.mnt / "big.bin")])
            if m.fetched() > 0:
                raise SystemExit("remount: the cache did not serve the whole file")
            return {"s": took}

    def local(self) -> dict[str, float]:
        with self.mount(source=str(self.archive)) as m:
            took, _, _ = run_timed([dd(m.mnt / "big.bin")])
            return {"s": took}

    def offsets(self, count: int) -> list[int]:
        size = self.where[b"big.bin"][1]
        rng = random.Random(26)
        return [rng.randrange(size // 4096) * 4096 for _ in range(count)]

    def preads(self, path: Path, count: int) -> dict[str, float]:
        fd = os.open(path, os.O_RDONLY)
        try:
            t = time.perf_counter()
            for off in self.offsets(count):
                if len(os.pread(fd, 4096, off)) != 4096:
                    raise SystemExit("rand4k: short read")
            took = time.perf_counter() - t
        finally:
            os.close(fd)
        return {"s": took, "iops": count / took}

    def rand4k(self, count: int) -> dict[str, float]:
        with self.mount() as m:
            out = self.preads(m.mnt / "big.bin", count)
            return out | {"fetched_per_read": m.fetched() / (count * 4096)}

    def rclone_seq(self) -> dict[str, float]:
        return self.rclone(lambda path: {"s": run_timed([dd(path)])[0]})

    def rclone_rand4k(self, count: int) -> dict[str, float]:
        return self.rclone(lambda path: self.preads(path, count))

    def peer_rand4k(self, count: int) -> dict[str, float]:
        offset = self.where[b"big.bin"][0]
        config = self.work / "rand4k.curl"
        parts = [
            f'url = "{self.url}"\nrange = {offset + o}-{offset + o + 4095}\noutput = /dev/null\n'
            for o in self.offsets(count)
        ]
        config.write_text("next\n".join(parts))
        took, _, _ = run_timed([["curl", "-sf", "-K", str(config)]])
        return {"s": took, "iops": count / took}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.link_speed", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--par-size", default="128M")
    ap.add_argument("--rand", type=int, default=2000)
    ap.add_argument("--only", default=",".join(WORKLOADS))
    ap.add_argument(
        "--against",
        type=Path,
        default=None,
        metavar="DIR",
        help="pair each of our workloads with the same workload run by the daemon of DIR (a checkout of"
        " another commit, e.g. `git archive BASE | tar -x -C DIR`), instead of the peer: before/after in one run",
    )
    ap.add_argument("--json", nargs="?", const=AUTO_JSON, default=None, type=Path, metavar="OUT")
    args = ap.parse_args(argv)
    only = [w for w in args.only.split(",") if w]
    if unknown := set(only) - set(WORKLOADS):
        raise SystemExit(f"--only: unknown workload(s) {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        raise SystemExit("needs root (mounts)")
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    janitor = Janitor(WORK_ROOT)
    for line in janitor.recover(None):
        print(f"recovered: {line}", flush=True)
    work = fresh_dir(WORK_ROOT / "run")
    info, info_line = machine()
    print(info_line, flush=True)
    rows: list[dict[str, Any]] = []
    with cleanup_on_term():
        try:
            archive = ensure_archive(WORK_ROOT, parse_size(args.size), parse_size(args.par_size))
            registry = start_registry(janitor, work, work / "storage", "127.0.0.1", free_port(), netns=False)
            ref = f"{registry.addr}/{REPO}:v1"
            subprocess.run([*blobmount_cmd(), "push", "--archive", str(archive), ref], check=True, capture_output=True)
            bench = Bench(janitor, work, archive, ref, f"http://{registry.addr}/v2/{REPO}/blobs/{data_digest(archive)}")
            pairs: list[tuple[str, Callable[[], dict[str, float]], Callable[[], dict[str, float]]]] = []
            if "seq" in only:
                pairs.append(("seq", bench.seq, bench.peer_seq))
                pairs.append(("httpfs2", bench.seq, bench.httpfs2))
                pairs.append(("rclone-seq", bench.seq, bench.rclone_seq))
            if "remount" in only:
                pairs.append(("remount", lambda: (bench.seq(), bench.remount())[1], bench.local))
            if "par8" in only:
                pairs.append(("par8", bench.par8, bench.peer_par8))
            if "rand4k" in only:
                pairs.append(("rand4k", lambda: bench.rand4k(args.rand), lambda: bench.peer_rand4k(args.rand)))
                pairs.append(("rclone-rand4k", lambda: bench.rand4k(args.rand), lambda: bench.rclone_rand4k(args.rand)))
            if args.against is not None:
                base = args.against.resolve()
                pairs = [
                    (f"{name} vs {base.name}", ours_fn, lambda f=ours_fn: bench.against(base, f))  # type: ignore[misc]
                    for name, ours_fn, _ in pairs
                    if name in WORKLOADS
                ]
            for rep in range(args.reps):
                for name, ours_fn, peer_fn in pairs:
                    first_ours = rep % 2 == 0
                    a = ours_fn() if first_ours else None
                    peer = peer_fn()
                    ours = a if a is not None else ours_fn()
                    row = {"workload": name, "rep": rep, "ours": ours, "peer": peer, "load": loadavg()}
                    row["ratio"] = peer["s"] / ours["s"]  # > 1: ours faster
                    rows.append(row)
                    print(f"{name} rep {rep}: ours {fmt(ours)}; peer {fmt(peer)}", flush=True)
                    print(f"    peer/ours {row['ratio']:.2f}; load {row['load']}", flush=True)
            janitor.stop(registry.proc)
        finally:
            janitor.stop_all()
    gib = parse_size(args.size) / 2**30
    print(
        "\n| workload | ours s (median) | peer s (median) | peer time / ours, median of pairs [min-max] | target"
        " | daemon CPU-s/GiB | peer CPU-s/GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == name]
        ratios = [r["ratio"] for r in mine]
        workload = name.split(" vs ")[0]
        per = gib if workload in ("seq", "httpfs2", "rclone-seq") else parse_size(args.par_size) * PAR / 2**30
        cpu = [r["ours"]["cpu"] / per for r in mine if "cpu" in r["ours"]]
        pcpu = [r["peer"]["cpu"] / per for r in mine if "cpu" in r["peer"]]
        extra = ""
        if workload in ("rand4k", "rclone-rand4k"):
            extra = f" (fetched/read {median([r['ours']['fetched_per_read'] for r in mine]):.1f}, target <= 16)"
        cpus = f"{median(cpu):.2f} | {median(pcpu):.2f}" if cpu and pcpu else " | "
        print(
            f"| {name} | {median([r['ours']['s'] for r in mine]):.2f} | {median([r['peer']['s'] for r in mine]):.2f}"
            f" | {median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]{extra}"
            f" | {'>= ' + str(TARGETS[name]) if name in TARGETS else '> 1: this checkout faster'} | {cpus} |"
        )
    if args.json is not None:
        out = default_json_path("link-speed") if args.json == AUTO_JSON else args.json
        write_json(
            out,
            {
                "benchmark": "link_speed",
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(["python -m bench.link_speed", *(argv if argv is not None else sys.argv[1:])]),
                "machine": info,
                "code": code_state(),
                "rows": rows,
            },
        )
        print(f"wrote {out}")
    return 0


def fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in d.items())


if __name__ == "__main__":
    raise SystemExit(main())
