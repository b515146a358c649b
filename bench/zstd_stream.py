"""Large zstd files served while they decode: time to first byte and a cold sequential read, beside
``curl | zstd -d | openssl dgst -sha256`` of the same bytes, one run.

    python -m bench.zstd_stream [--sizes 64M,384M,2G] [--reps 3] [--json [OUT]]
                               [--trees BEFORE AFTER]

Compressible text (words of a fixed vocabulary in random order, ~3.5x with zstd; files above 64 MiB
are rotated copies of a 64 MiB base, each with its own first line, so zstd's window never sees a
repeat) goes into one archive (``blobmount create``, zstd level 3) pushed to a docker-registry on
loopback. Per size and repetition, each with a fresh mount and an empty cache directory:

- ``ttfb``: ``open`` + ``pread(4096, 0)`` of the file through the mount (the mount's own start
  excluded); the figure is that it stays small and does not grow with the size (target <= 50 ms);
- ``seq``: ``openssl dgst -sha256 MOUNT/FILE``, the whole file cold;
- ``pipe``: ``curl -r`` of the file's frame from the registry ``| zstd -d | openssl dgst -sha256``,
  the same bytes decoded and hashed by the fastest tools at hand (target: ``pipe / seq >= 0.8``).

With each ``seq``: the daemon's CPU (utime + stime from /proc, per GiB of the file) and the pipe's
(its three processes). ``--trees BEFORE AFTER`` (two blobmount source trees, ``PYTHONPATH`` per
mount, as bench/registry_pairs.py) runs ``seq`` for both in every repetition, in alternating order
(before-after, after-before, ...), beside the same ``pipe``: a before/after in one run, whose
ratios are taken per pair.

The page cache is not dropped (a shared machine): the registry's blob is read warm for both. The
load average is printed with every row; on a loaded machine compare the ratios, not the seconds.
Printed, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import cleanup_on_term, code_state, default_json_path, loadavg, machine, median, write_json
from bench.janitor import Janitor, fresh_dir, unmount
from bench.peers import blobmount_cmd
from bench.servers import free_port, start_registry

WORK_ROOT = Path(os.environ.get("BENCH_ZSTD_WORK_ROOT", "/var/tmp/blobmount-bench-zstd"))
AUTO_JSON = Path("-")
BASE_BYTES = 64 << 20
MOUNT_WAIT_S = 60.0
RUN_TIMEOUT_S = 900.0
REPO = "bench/zstd-stream"
TTFB_TARGET_S = 0.050
SEQ_TARGET = 0.8
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    if text[-1:] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def base_text(seed: int = 25) -> bytes:
    rng = random.Random(seed)
    letters = b"etaoinshrdlucmfwypvbgkjqxz"
    words = [bytes(rng.choices(letters, k=rng.randint(1, 10))) for _ in range(6000)]
    lines = []
    size = 0
    while size < BASE_BYTES:
        line = b" ".join(rng.choices(words, k=rng.randint(4, 16))) + b"\n"
        lines.append(line)
        size += len(line)
    return b"".join(lines)[:BASE_BYTES]


def write_text(path: Path, size: int, base: bytes) -> None:
    """`size` bytes: rotated copies of `base`, each behind its own first line."""
    rng = random.Random(size)
    with open(path, "wb") as f:
        left = size
        part = 0
        while left > 0:
            cut = rng.randrange(len(base))
            block = f"part {part} of {path.name}\n".encode() + base[cut:] + base[:cut]
            f.write(block[:left])
            left -= min(left, len(block))
            part += 1


def ensure_archive(work: Path, sizes: list[int]) -> tuple[Path, dict[int, str]]:
    """The archive of one text file per size (kept between runs: generating 2 GiB takes a while)."""
    names = {size: f"text-{size >> 20}M.txt" for size in sizes}
    out = work / ("archive-" + "-".join(str(s >> 20) for s in sizes))
    if (out / "index.blob").exists():
        return out, names
    src = work / "src"
    fresh_dir(src)
    base = base_text()
    for size, name in names.items():
        write_text(src / name, size, base)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([*blobmount_cmd(), "create", str(src), str(tmp), "--no-progress"], check=True, timeout=RUN_TIMEOUT_S)
    tmp.rename(out)
    shutil.rmtree(src, ignore_errors=True)
    return out, names


def spans(archive: Path) -> dict[bytes, tuple[int, int, str]]:
    """path -> (data_offset, data_size, sha256 hex) from the archive's index."""
    from blobmount.index import IndexView

    view = IndexView((archive / "index.blob").read_bytes())
    return {e.path: (e.data_offset, e.data_size, e.hash.hex()) for e in view.entries()}


def data_digest(archive: Path) -> str:
    cmd = ["openssl", "dgst", "-sha256", "-r", str(archive / "data.blob")]
    out = subprocess.run(cmd, capture_output=True, check=True)
    return "sha256:" + out.stdout.split()[0].decode()


class Mount:
    """`blobmount mount -f` of the pushed archive with an empty cache; always taken down."""

    def __init__(self, janitor: Janitor, work: Path, ref: str, n: int, tree: Path | None = None) -> None:
        """`tree`: a blobmount source tree to run the daemon from (``PYTHONPATH``)."""
        self.janitor = janitor
        self.tree = tree
        self.mnt = work / f"mnt-{n}"
        self.cache = work / f"cache-{n}"
        self.log = work / f"mount-{n}.log"
        self.ref = ref

    def __enter__(self) -> Path:
        fresh_dir(self.mnt)
        fresh_dir(self.cache)
        extra = os.environ.get("BENCH_MOUNT_ARGS", "").split()  # e.g. "--log-level debug" to look inside
        base, env, cwd = blobmount_cmd(), None, None
        if self.tree is not None:
            base, env, cwd = [sys.executable, "-m", "blobmount.cli"], tree_env(self.tree), self.tree
        cmd = [*base, "mount", "-f", self.ref, str(self.mnt), "--cache-dir", str(self.cache), *extra]
        self.proc = self.janitor.spawn(cmd, self.log, env=env, cwd=cwd)
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.janitor.stop(self.proc)
                raise SystemExit(f"mount failed: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        if os.path.ismount(self.mnt):
            unmount(self.mnt)
        self.janitor.wait_exit(self.proc, 30.0)
        shutil.rmtree(self.cache, ignore_errors=True)


def tree_env(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(tree))


def check_tree(tree: Path) -> None:
    """The daemon imports blobmount from `tree`, not from the installed (editable) package. Run
    from `tree` as its working directory: ``python -m`` puts the working directory first on
    ``sys.path``, ahead of PYTHONPATH."""
    cmd = [sys.executable, "-c", "import blobmount; print(blobmount.__file__)"]
    out = subprocess.run(cmd, env=tree_env(tree), cwd=tree, capture_output=True, check=True, text=True)
    if not Path(out.stdout.strip()).is_relative_to(tree):
        raise SystemExit(f"--trees: blobmount comes from {out.stdout.strip()}, not {tree}")


def ttfb(path: Path) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    took = time.perf_counter() - t
    assert len(data) == 4096, path
    return took


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def proc_cpu(pid: int) -> float:
    """utime + stime of a running process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str] | str, want: str, shell: bool = False) -> tuple[float, float]:
    """Wall seconds and CPU seconds (of the command's processes) of one run."""
    c = children_cpu()
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, check=True, shell=shell, timeout=RUN_TIMEOUT_S)
    took = time.perf_counter() - t
    got = out.stdout.split()[0].decode()
    if got != want:
        raise SystemExit(f"{cmd}: wrong sha256 {got}, expected {want}")
    return took, children_cpu() - c


def seq_trial(
    janitor: Janitor, work: Path, ref: str, n: int, tree: Path | None, path: str, want: str
) -> dict[str, float]:
    """A cold `openssl dgst` of the file through a fresh mount: wall s, daemon and openssl CPU-s."""
    mount = Mount(janitor, work, ref, n, tree)
    with mount as mnt:
        c0 = proc_cpu(mount.proc.pid)
        took, ossl = timed(["openssl", "dgst", "-sha256", "-r", str(mnt / path)], want)
        c1 = proc_cpu(mount.proc.pid)
    return {"seq": took, "daemon_cpu": c1 - c0, "openssl_cpu": ossl}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.zstd_stream", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--sizes", default="64M,384M,2G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", nargs="?", const=AUTO_JSON, default=None, type=Path, metavar="OUT")
    ap.add_argument("--trees", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), default=None)
    args = ap.parse_args(argv)
    sides: list[tuple[str, Path | None]] = [("", None)]
    if args.trees is not None:
        sides = [("before", args.trees[0].resolve()), ("after", args.trees[1].resolve())]
        for _, tree in sides:
            assert tree is not None
            check_tree(tree)
    if os.geteuid() != 0:
        raise SystemExit("needs root (mounts)")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    janitor = Janitor(WORK_ROOT)
    for line in janitor.recover(None):
        print(f"recovered: {line}", flush=True)
    work = WORK_ROOT / "run"
    fresh_dir(work)
    info, info_line = machine()
    print(info_line, flush=True)
    rows: list[dict[str, Any]] = []
    with cleanup_on_term():
        try:
            archive, names = ensure_archive(WORK_ROOT, sizes)
            where = spans(archive)
            digest = data_digest(archive)
            registry = start_registry(janitor, work, work / "storage", "127.0.0.1", free_port(), netns=False)
            ref = f"{registry.addr}/{REPO}:v1"
            subprocess.run([*blobmount_cmd(), "push", "--archive", str(archive), ref], check=True, capture_output=True)
            blob_url = f"http://{registry.addr}/v2/{REPO}/blobs/{digest}"
            n = 0
            for rep in range(args.reps):
                for size in sizes:
                    name = names[size]
                    offset, stored, want = where[name.encode()]
                    pipe = f"curl -sf -r {offset}-{offset + stored - 1} {blob_url} | zstd -dc | openssl dgst -sha256 -r"
                    pipe_s, pipe_cpu = timed(pipe, want, shell=True)
                    order = sides if rep % 2 == 0 else sides[::-1]
                    for side, tree in order:
                        row: dict[str, Any] = {"size": size, "rep": rep, "stored": stored, "side": side}
                        n += 1
                        with Mount(janitor, work, ref, n, tree) as mnt:
                            row["ttfb"] = ttfb(mnt / name)
                        n += 1
                        row.update(seq_trial(janitor, work, ref, n, tree, name, want))
                        row["pipe"], row["pipe_cpu"] = pipe_s, pipe_cpu
                        row["ratio"] = row["pipe"] / row["seq"]
                        row["load"] = loadavg()
                        rows.append(row)
                        gib = size / 2**30
                        print(
                            f"{size >> 20} MiB (frame {stored >> 20} MiB) rep {rep}{' ' + side if side else ''}:"
                            f" ttfb {row['ttfb'] * 1000:.1f} ms; seq {row['seq']:.2f} s"
                            f" ({size / row['seq'] / 2**20:.0f} MiB/s, daemon {row['daemon_cpu'] / gib:.2f} CPU-s/GiB,"
                            f" openssl {row['openssl_cpu'] / gib:.2f}); pipe {row['pipe']:.2f} s"
                            f" ({pipe_cpu / gib:.2f} CPU-s/GiB); pipe/seq {row['ratio']:.2f}; load {row['load']}",
                            flush=True,
                        )
            janitor.stop(registry.proc)
        finally:
            janitor.stop_all()
    print(
        "| size | side | ttfb ms (median, max) | seq s [min-max] | seq MiB/s | daemon CPU-s/GiB"
        " | curl \\| zstd -d \\| openssl s (CPU-s/GiB) | pipe / seq, median of pairs [min-max] (target >= 0.8) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        gib = size / 2**30
        for side, _ in sides:
            mine = [r for r in rows if r["size"] == size and r["side"] == side]
            if not mine:
                continue
            ttfbs = [r["ttfb"] * 1000 for r in mine]
            seqs = [r["seq"] for r in mine]
            ratios = [r["ratio"] for r in mine]
            print(
                f"| {size >> 20} MiB | {side or '-'} | {median(ttfbs):.1f}, {max(ttfbs):.1f}"
                f" | {median(seqs):.2f} [{min(seqs):.2f}-{max(seqs):.2f}] | {size / median(seqs) / 2**20:.0f}"
                f" | {median([r['daemon_cpu'] for r in mine]) / gib:.2f}"
                f" | {median([r['pipe'] for r in mine]):.2f} ({median([r['pipe_cpu'] for r in mine]) / gib:.2f})"
                f" | {median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] |"
            )
        if len(sides) == 2:
            pairs: dict[int, dict[str, dict[str, Any]]] = {}
            for r in rows:
                if r["size"] == size:
                    pairs.setdefault(r["rep"], {})[r["side"]] = r
            full = [p for p in pairs.values() if len(p) == 2]
            if full:
                speed = [p["before"]["seq"] / p["after"]["seq"] for p in full]
                cpu = [p["after"]["daemon_cpu"] / p["before"]["daemon_cpu"] for p in full]
                print(
                    f"| {size >> 20} MiB | after/before, per pair | | speed {median(speed):.2f}x"
                    f" [{min(speed):.2f}-{max(speed):.2f}] | | daemon CPU {median(cpu):.2f}x"
                    f" [{min(cpu):.2f}-{max(cpu):.2f}] | | |"
                )
    if args.json is not None:
        out = default_json_path("zstd-stream") if args.json == AUTO_JSON else args.json
        write_json(
            out,
            {
                "benchmark": "zstd_stream",
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(["python -m bench.zstd_stream", *(argv if argv is not None else sys.argv[1:])]),
                "machine": info,
                "code": code_state(),
                "rows": rows,
            },
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
