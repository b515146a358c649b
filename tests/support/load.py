"""Load with faults: many readers (threads and processes) doing mixed sequential and random reads
over a large archive mounted from a real registry through the fault proxy, every byte checked.

The archive is a pure function of (files, seed): each worker recomputes any file's bytes from its
number, so processes need no shared state and every read is compared with the truth. Reads drop
the kernel's pages of a file at random (``POSIX_FADV_DONTNEED``) so the daemon keeps being asked.

Outcome per run: reads, bytes checked, wrong bytes (must be 0), errors by errno (only EIO may
occur, and only while faults are on), reads slower than the hang guard (must be 0), latency
percentiles, the daemon's peak RSS and open fds, and a final pass that re-reads every file that
failed, with the faults off: a transient fault must never have poisoned it.

CI runs it through tests/fuse/test_load.py (short). For a soak (one command, longer)::

    .venv/bin/python -m tests.support.load --soak --seconds 3600 [--files 20000] [--readers 64] [--fault-rate 0.02]

It starts its own docker-registry and mount under a temp dir and prints the JSON report.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from blobmount.index import COMPRESSION_NONE, COMPRESSION_ZSTD, EntryRecord, build_index

if TYPE_CHECKING:  # the proxy (and pytest under it) only in the process that serves it, not workers
    from tests.support.faults import Fault

KiB, MiB = 1 << 10, 1 << 20
TIMEOUT_S = 2.0  # the mount's --timeout
HANG_GUARD_S = 10 * TIMEOUT_S  # a single read slower than this counts as hung
LARGE_EVERY = 500  # one file in this many is large (1-6 MiB)
SMALL_MAX_BYTES = 32 * KiB
FILES_PER_DIR = 200
RSS_LIMIT_BYTES = 512 * MiB  # daemon peak RSS bound (its budgets: 64 MiB decoded LRU + index + pools)
REPO = "load/archive:v1"


# -- the archive: a pure function of (files, seed) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class FileSpec:
    number: int
    path: str
    size: int
    zstd: bool


def layout(files: int, seed: int) -> list[FileSpec]:
    rng = random.Random(seed)
    out = []
    for i in range(files):
        large = i % LARGE_EVERY == LARGE_EVERY // 2
        size = rng.randrange(1 * MiB, 6 * MiB) if large else int(2 ** rng.uniform(0, 15)) - 1
        zstd = rng.random() < 0.35
        ext = "txt" if zstd else "bin"
        out.append(FileSpec(i, f"d{i // FILES_PER_DIR:04d}/f{i:06d}.{ext}", size, zstd))
    return out


def content(spec: FileSpec, seed: int) -> bytes:
    """The bytes of one file: random for raw files, compressible text for zstd ones."""
    rng = random.Random(seed * 1_000_003 + spec.number)
    if not spec.zstd:
        return rng.randbytes(spec.size)
    line = b"%06d " % spec.number + rng.randbytes(24).hex().encode() + b"\n"
    reps = spec.size // len(line) + 1
    return (line * reps)[: spec.size]


def build(out: Path, files: int, seed: int) -> str:
    """Write OUT/index.blob + data.blob; return the data blob's digest."""
    import zstandard

    out.mkdir(parents=True, exist_ok=True)
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
    records = []
    hasher = hashlib.sha256()
    pos = 0
    with open(out / "data.blob", "wb") as blob:
        for spec in layout(files, seed):
            data = content(spec, seed)
            stored = cctx.compress(data) if spec.zstd else data
            blob.write(stored)
            hasher.update(stored)
            comp = COMPRESSION_ZSTD if spec.zstd else COMPRESSION_NONE
            digest = hashlib.sha256(data).digest()
            records.append(EntryRecord(spec.path.encode(), pos, len(stored), len(data), digest, 0o644, 0, 0, 0, comp))
            pos += len(stored)
    (out / "index.blob").write_bytes(build_index(records, pos, hasher.digest()))
    return "sha256:" + hasher.hexdigest()


# -- readers -------------------------------------------------------------------------------------


@dataclass
class Tally:
    reads: int = 0
    bytes_checked: int = 0
    wrong: int = 0
    hung: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    failed_files: set[int] = field(default_factory=set)
    latencies_us: list[int] = field(default_factory=list)
    wrong_examples: list[str] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")  # (seconds, what) of the slowest single call

    def merge(self, other: Tally) -> None:
        self.reads += other.reads
        self.bytes_checked += other.bytes_checked
        self.wrong += other.wrong
        self.hung += other.hung
        self.errors.update(other.errors)
        self.failed_files |= other.failed_files
        self.latencies_us += other.latencies_us
        self.wrong_examples += other.wrong_examples[: max(0, 5 - len(self.wrong_examples))]
        if other.slowest[0] > self.slowest[0]:
            self.slowest = other.slowest

    def to_json(self) -> str:
        doc = asdict(self)
        doc["errors"] = dict(self.errors)
        doc["failed_files"] = sorted(self.failed_files)
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> Tally:
        doc = json.loads(text)
        return cls(
            doc["reads"],
            doc["bytes_checked"],
            doc["wrong"],
            doc["hung"],
            Counter(doc["errors"]),
            set(doc["failed_files"]),
            doc["latencies_us"],
            doc["wrong_examples"],
            (float(doc["slowest"][0]), str(doc["slowest"][1])),
        )


def read_loop(mnt: Path, files: int, seed: int, reader_seed: int, seconds: float) -> Tally:
    """One reader: until the deadline, pick a file and read it sequentially or at random."""
    specs = layout(files, seed)
    rng = random.Random(reader_seed)
    tally = Tally()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        spec = specs[rng.randrange(len(specs))]
        truth = content(spec, seed)
        path = mnt / spec.path
        t0 = time.monotonic()
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            _failed(tally, spec, exc, time.monotonic() - t0)
            continue
        finally:
            elapsed = time.monotonic() - t0
            if elapsed > tally.slowest[0]:
                tally.slowest = (elapsed, f"open {spec.path} ({spec.size} bytes, {'zstd' if spec.zstd else 'raw'})")
            if elapsed > HANG_GUARD_S:
                tally.hung += 1
        try:
            if rng.random() < 0.5:
                _sequential(fd, spec, truth, rng, tally)
            else:
                _random(fd, spec, truth, rng, tally)
            if rng.random() < 0.5:  # make the next read of this file reach the daemon again
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            _failed(tally, spec, exc, 0.0)
        finally:
            os.close(fd)
    return tally


def _failed(tally: Tally, spec: FileSpec, exc: OSError, elapsed: float) -> None:
    tally.errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
    tally.failed_files.add(spec.number)
    if elapsed > HANG_GUARD_S:
        tally.hung += 1


def _timed_pread(fd: int, size: int, offset: int, tally: Tally, spec: FileSpec) -> bytes:
    t0 = time.monotonic()
    outcome = "ok"
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno or 0, "?")
        raise
    finally:
        elapsed = time.monotonic() - t0
        tally.latencies_us.append(int(elapsed * 1e6))
        if elapsed > HANG_GUARD_S:
            tally.hung += 1
        if elapsed > tally.slowest[0]:
            what = f"pread {spec.path} ({spec.size} bytes, {'zstd' if spec.zstd else 'raw'}) {offset}+{size}: {outcome}"
            tally.slowest = (elapsed, what)


def _check(spec: FileSpec, truth: bytes, offset: int, size: int, got: bytes, tally: Tally) -> None:
    tally.reads += 1
    want = truth[offset : offset + size]
    tally.bytes_checked += len(got)
    if got != want:
        tally.wrong += 1
        if len(tally.wrong_examples) < 5:
            tally.wrong_examples.append(f"{spec.path} {offset}+{size}: got {len(got)} bytes, want {len(want)}")


def _sequential(fd: int, spec: FileSpec, truth: bytes, rng: random.Random, tally: Tally) -> None:
    offset = 0
    while True:
        size = rng.choice((4 * KiB, 64 * KiB, 128 * KiB, 1 * MiB))
        try:
            got = _timed_pread(fd, size, offset, tally, spec)
        except OSError as exc:
            _failed(tally, spec, exc, 0.0)
            return
        _check(spec, truth, offset, size, got, tally)
        if len(got) < size:
            return
        offset += len(got)


def _random(fd: int, spec: FileSpec, truth: bytes, rng: random.Random, tally: Tally) -> None:
    for _ in range(rng.randrange(1, 8)):
        offset = rng.randrange(0, spec.size + 1)
        size = rng.randrange(1, 256 * KiB)
        try:
            got = _timed_pread(fd, size, offset, tally, spec)
        except OSError as exc:
            _failed(tally, spec, exc, 0.0)
            return
        _check(spec, truth, offset, size, got, tally)


# -- the daemon under watch ----------------------------------------------------------------------


@dataclass
class DaemonWatch:
    """Samples the daemon's RSS and open fds until stopped."""

    pid: int
    peak_rss_bytes: int = 0
    peak_fds: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.sample()

    def sample(self) -> None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_bytes = max(self.peak_rss_bytes, int(line.split()[1]) * 1024)
        self.peak_fds = max(self.peak_fds, fds)
        self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Report:
    files: int
    readers_threads: int
    readers_processes: int
    seconds: float
    fault_rate: float
    faults_injected: dict[str, int]
    reads: int
    bytes_checked: int
    wrong: int
    hung: int
    errors: dict[str, int]
    files_failed: int
    files_failed_after_faults_cleared: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    slowest_call: str
    daemon_peak_rss_mib: float
    daemon_peak_fds: int
    wrong_examples: list[str]


def random_faults(digest: str, rate: float) -> list[Fault]:
    """Faults spread over the data blob's requests, `rate` of them in all."""
    from tests.support.faults import Fault, Kind, blob

    mix: list[tuple[float, Callable[[], Fault]]] = [
        (0.20, lambda: Fault(Kind.STATUS, status=503)),
        (0.10, lambda: Fault(Kind.STATUS, status=429, retry_after="0")),
        (0.05, lambda: Fault(Kind.STATUS, status=500)),
        (0.15, lambda: Fault(Kind.RESET)),
        (0.15, lambda: Fault(Kind.TRUNCATE)),
        (0.10, lambda: Fault(Kind.CLOSE)),
        (0.07, lambda: Fault(Kind.CONTENT_RANGE)),
        (0.07, lambda: Fault(Kind.LONGER)),
        (0.06, lambda: Fault(Kind.STALL, stall_s=3 * TIMEOUT_S)),
        (0.05, lambda: Fault(Kind.STALL_BODY, stall_s=3 * TIMEOUT_S)),
    ]
    faults: list[Fault] = []
    taken = 0.0  # share of requests the earlier faults in the list already take
    for share, make in mix:
        fault = make()
        fault.match = blob(digest)
        # tried in order, each with its own draw: P(this one) = p * (1 - rate * taken) = rate * share
        fault.probability = rate * share / (1.0 - rate * taken)
        taken += share
        faults.append(fault)
    return faults


def run(
    mnt: Path,
    daemon_pid: int,
    proxy: object,
    digest: str,
    *,
    files: int,
    seed: int,
    threads: int,
    processes: int,
    seconds: float,
    fault_rate: float,
) -> Report:
    """Readers against a live mount while `proxy` (a FaultProxy) injects faults; then a clean pass."""
    from tests.support.faults import FaultProxy

    assert isinstance(proxy, FaultProxy)
    injected = [proxy.add(f) for f in random_faults(digest, fault_rate)]
    watch = DaemonWatch(daemon_pid)
    total = Tally()
    # Every reader runs outside this process, which serves the fault proxy: reader threads here
    # would starve the proxy of the GIL and measure the proxy, not the mount. `threads` readers
    # share one process (threads over one set of fds, as in a multi-threaded program); each of
    # the `processes` readers has its own.
    groups = [threads] if threads else []
    groups += [1] * processes
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.load",
                "worker",
                *map(str, (mnt, files, seed, 1000 * (k + 1), seconds, n)),
            ],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        for k, n in enumerate(groups)
    ]
    join_by = time.monotonic() + seconds + 3 * HANG_GUARD_S
    stuck = 0
    for w in workers:
        try:
            out, _ = w.communicate(timeout=max(1.0, join_by - time.monotonic()))
            total.merge(Tally.from_json(out.decode().strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            stuck += 1
            w.kill()
            w.communicate()
    proxy.clear()
    watch.stop()
    total.hung += stuck  # a worker that never finished holds a read that never returned
    # faults off: every file that failed must now read right (nothing was poisoned)
    specs = layout(files, seed)
    still_failing = 0
    for number in sorted(total.failed_files):
        try:
            if (mnt / specs[number].path).read_bytes() != content(specs[number], seed):
                total.wrong += 1
        except OSError:
            still_failing += 1
    lat = sorted(total.latencies_us) or [0]
    return Report(
        files=files,
        readers_threads=threads,
        readers_processes=processes,
        seconds=seconds,
        fault_rate=fault_rate,
        faults_injected={f.kind.value: f.hits for f in injected if f.hits},
        reads=total.reads,
        bytes_checked=total.bytes_checked,
        wrong=total.wrong,
        hung=total.hung,
        errors=dict(total.errors),
        files_failed=len(total.failed_files),
        files_failed_after_faults_cleared=still_failing,
        p50_ms=lat[len(lat) // 2] / 1000,
        p99_ms=lat[min(len(lat) - 1, len(lat) * 99 // 100)] / 1000,
        max_ms=lat[-1] / 1000,
        slowest_call=f"{total.slowest[0]:.2f} s: {total.slowest[1]}",
        daemon_peak_rss_mib=round(watch.peak_rss_bytes / MiB, 1),
        daemon_peak_fds=watch.peak_fds,
        wrong_examples=total.wrong_examples,
    )


# -- command line: a worker process, or a whole soak run -----------------------------------------


def _worker(argv: list[str]) -> int:
    """`threads` readers in this process; one JSON tally on stdout."""
    mnt, files, seed, reader_seed, seconds, threads = argv
    total = Tally()
    lock = threading.Lock()

    def one(k: int) -> None:
        tally = read_loop(Path(mnt), int(files), int(seed), int(reader_seed) + k, float(seconds))
        with lock:
            total.merge(tally)

    pool = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(int(threads))]
    for t in pool:
        t.start()
    for t in pool:
        t.join(float(seconds) + 3 * HANG_GUARD_S)
    total.hung += sum(t.is_alive() for t in pool)
    print(total.to_json(), flush=True)
    return 0


@dataclass
class Setup:
    mnt: Path
    pid: int
    proxy: object
    digest: str


@contextlib.contextmanager
def mounted_archive(root: Path, registry: object, files: int, seed: int) -> Iterator[Setup]:
    """Build, push, and mount (through a FaultProxy) an archive; the caller runs readers."""
    import functools

    import trio

    from blobmount.reference import Reference
    from blobmount.registry.client import RegistryOptions
    from blobmount.registry.push import push_archive
    from tests.support.faults import FaultProxy
    from tests.support.mounts import mounted
    from tests.support.servers import Registry

    assert isinstance(registry, Registry)
    digest = build(root / "archive", files, seed)
    ref = Reference.parse(f"{registry.host}/{REPO}")
    trio.run(functools.partial(push_archive, root / "archive", ref, RegistryOptions()))
    proxy = FaultProxy(registry.host, seed=seed)
    try:
        with mounted(f"{proxy.host}/{REPO}", root / "mnt", "--timeout", str(TIMEOUT_S)) as m:
            yield Setup(m.path, m.proc.pid, proxy, digest)
    finally:
        proxy.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        return _worker(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m tests.support.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak", action="store_true", help="a long run (default 1 hour)")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--readers", type=int, default=64, help="half threads, half processes")
    parser.add_argument("--fault-rate", type=float, default=0.02, help="share of data requests faulted")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (3600.0 if args.soak else 30.0)
    from tests.support.servers import start_registry

    with tempfile.TemporaryDirectory(prefix="blobmount-load-") as tmp:
        root = Path(tmp)
        registry = start_registry(root / "registry")
        try:
            with mounted_archive(root, registry, args.files, args.seed) as setup:
                report = run(
                    setup.mnt,
                    setup.pid,
                    setup.proxy,
                    setup.digest,
                    files=args.files,
                    seed=args.seed,
                    threads=args.readers // 2,
                    processes=args.readers - args.readers // 2,
                    seconds=seconds,
                    fault_rate=args.fault_rate,
                )
        finally:
            registry.stop()
    print(json.dumps(asdict(report), indent=2))
    bad = report.wrong or report.hung or report.files_failed_after_faults_cleared or set(report.errors) - {"EIO"}
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
