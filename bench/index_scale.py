"""How the index's costs grow with its entries: open, lookup (file, directory, miss), listing a 10k
directory, peak RSS; indexes in byte order (what we write) and in walk order (what the reference
writes), each measured in a fresh process.

Indexes of 10k, 100k and 1M entries are generated with source-tree-like paths (~60 bytes: nested
directories, names joined by ``-``, ``.`` and ``_``, files such as ``foo.c`` and ``foo-test.c`` beside
a directory ``foo/``, so the two orders really differ) and one directory of 10,000 files (half the
entries when there are fewer than 20,000). Entries hold no data (data_size 0, blob_size 0): the index
is what is measured. Generated indexes are cached in bench/.cache, keyed by the generator's and the
index builder's source, so only the first run pays the build (~15 s per order for 1M entries).

Each (size, order) runs in its own interpreter, which reads the index file, times
``IndexView(buf, blob_size=0)``, then lookups of 2,000 paths of each kind (file, directory, miss)
through ``view.kind`` (what the filesystem calls) and ``view.find``, and ``list(view.children(dir))``
of the big directory. Lookups run in three wall-clock rounds, the kinds taking turns; the median
pools every sample and the best round's p99 is judged (preemption on a shared 2-core machine hits a
round, a slow code path hits all of them). Each round times the lookups again on the thread's CPU
clock; that, the count of involuntary context switches and the machine's steal time help tell the
code's tail from the neighbours'.

Peak RSS is the kernel's high-water mark of the child (VmHWM). ``ru_maxrss`` is printed beside it but
not used: Linux carries the peak of the process image an exec replaces into it, so a child inherits
its parent's peak. The parent therefore never loads an index, and builds them in children too. Only
after the RSS is read does the child time the obvious peer: every path materialised into a Python
list (its "open") and ``bisect`` over it (its lookup), which puts the view's figures into proportion
on this machine in this run.

Targets (issue 2): open of 1M entries < 1 s; lookup < 50 us; RSS < index bytes + 100 MB. They are
printed with the measured value's ratio to the limit; nothing is asserted (the machine is shared).

    python -m bench.index_scale [--sizes 10000,100000,1000000] [--quick] [--json [OUT]]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import AUTO_JSON, code_state, default_json_path, loadavg, machine, percentile, write_json

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache"
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000,)
ORDERS = ("bytes", "walk")
SEED = 1
LOOKUPS = 2_000  # distinct paths per kind of lookup: a p99 is the 20th-slowest of a round
ROUNDS = 3  # each kind's lookups run this many times, the kinds taking turns
LOOKUP_KINDS = ("kind_file", "kind_dir", "kind_miss")  # the filesystem's lookups, judged against the target
BIG_DIR = b"src/drivers/net/ethernet/intel-e1000e"  # the directory listed; holds BIG_DIR_FILES files
BIG_DIR_FILES = 10_000
FILES_PER_DIR = 14  # with DIR_DEPTH_MAX, gives a mean path of ~60 bytes at 100k-1M entries
DIR_DEPTH_MAX = 6
TOP_DIRS = (b"src", b"lib", b"tests", b"docs", b"tools", b"third_party", b"include", b"scripts", b"examples", b"pkg")
WORDS = (
    b"core", b"net", b"fs", b"mm", b"util", b"io", b"http", b"parser", b"crypto", b"sound", b"arch", b"block",
    b"sched", b"ipc", b"json", b"config", b"cache", b"event", b"render", b"storage", b"codec", b"driver",
    b"kernel", b"proto", b"server", b"client", b"common", b"internal", b"platform", b"widget",
)  # fmt: skip
SEPS = (b"-", b"_", b".", b"")
EXTS = (b".c", b".h", b".py", b".rs", b".go", b".md", b".txt", b".json", b".test.js", b"_test.go", b"-inl.h", b".cc")
# Files next to a directory of the same stem: '-', '.' and ' ' sort below '/', so these are the
# entries whose place differs between byte order and walk order.
SIBLING_SUFFIXES = (b".c", b".h", b".py", b"-test.c", b".md", b"-old", b".rs", b" copy")
SIBLING_SHARE = 0.04
# Misses are built with names the generator never makes (no name starts with '.' or ends in '.orig').
MISS_FILE_SUFFIX = b".orig"
MISS_DIR_NAME = b".git"
TARGET_OPEN_S = 1.0
TARGET_OPEN_ENTRIES = 1_000_000
TARGET_LOOKUP_US = 50.0
TARGET_RSS_OVER_INDEX_BYTES = 100_000_000


# -- generating and building (in a child process) ----------------------------------------------------


def _name(rng: random.Random) -> bytes:
    word = rng.choice(WORDS)
    r = rng.random()
    if r < 0.5:
        return word + rng.choice(SEPS) + rng.choice(WORDS)
    if r < 0.8:
        return word + rng.choice(SEPS) + b"%d" % rng.randrange(100)
    return word


def make_paths(n: int, seed: int = SEED) -> list[bytes]:
    """`n` distinct file paths of a source-like tree, in byte order; BIG_DIR holds exactly
    min(BIG_DIR_FILES, n // 2) of them and nothing else. No path is also a directory."""
    rng = random.Random(seed)
    big = min(BIG_DIR_FILES, n // 2)
    paths = {BIG_DIR + b"/e1000e_%05d.c" % i for i in range(big)}
    dirs = list(TOP_DIRS)
    dir_set = set(dirs)
    while len(dirs) < max(4 * len(TOP_DIRS), (n - big) // FILES_PER_DIR):
        parent = rng.choice(dirs)
        if parent.count(b"/") + 1 >= DIR_DEPTH_MAX:
            continue
        d = parent + b"/" + _name(rng)
        if d in dir_set or d == BIG_DIR or BIG_DIR.startswith(d + b"/"):
            continue
        dir_set.add(d)
        dirs.append(d)
    while len(paths) < n:
        d = rng.choice(dirs)
        if rng.random() < SIBLING_SHARE:
            path = d + rng.choice(SIBLING_SUFFIXES)
        else:
            path = d + b"/" + _name(rng) + rng.choice(EXTS)
        if path not in dir_set:
            paths.add(path)
    return sorted(paths)


def walk_key(path: bytes) -> bytes:
    """The reference writer's order: byte order with '/' ranked below every other byte."""
    return path.replace(b"/", b"\x00")


def cache_key() -> str:
    """Digest of everything the cached index bytes depend on: the generator and the index builder."""
    import flatbuffers  # only for its version

    digest = hashlib.sha256()
    for part in (
        inspect.getsource(_name),
        inspect.getsource(make_paths),
        inspect.getsource(_build_child),
        repr((SEED, BIG_DIR, BIG_DIR_FILES, FILES_PER_DIR, DIR_DEPTH_MAX, TOP_DIRS, WORDS, SEPS, EXTS)),
        repr((SIBLING_SUFFIXES, SIBLING_SHARE, getattr(flatbuffers, "__version__", "?"))),
    ):
        digest.update(part.encode() + b"\0")
    digest.update((REPO / "blobmount" / "index" / "build.py").read_bytes())
    return digest.hexdigest()[:12]


def cache_paths(n: int, key: str) -> tuple[dict[str, Path], Path]:
    return {order: CACHE / f"index-{n}-{order}-{key}.blob" for order in ORDERS}, CACHE / f"index-{n}-{key}.json"


def _build_child(n: int, key: str) -> None:
    """Generate `n` paths, build the index in both orders, write them and their stats to the cache."""
    from blobmount.index import EntryRecord, build_index  # children only: the parent stays small

    blobs, stats_path = cache_paths(n, key)
    started = time.perf_counter()
    by_bytes = make_paths(n)
    by_walk = sorted(by_bytes, key=walk_key)
    stats: dict[str, Any] = {
        "entries": n,
        "generate_s": time.perf_counter() - started,
        "mean_path_bytes": sum(map(len, by_bytes)) / n,
        "max_path_bytes": max(map(len, by_bytes)),
        "directories": len({p.rpartition(b"/")[0] for p in by_bytes}),
        # adjacent pairs of the byte order that the walk order puts the other way round
        "order_disagreements": sum(1 for a, b in itertools.pairwise(by_bytes) if walk_key(a) > walk_key(b)),
        "big_dir_files": min(BIG_DIR_FILES, n // 2),
        "build_s": {},
    }
    digest = hashlib.sha256(b"blobmount bench").digest()  # any 32 bytes: only the index is measured
    for order, paths in (("bytes", by_bytes), ("walk", by_walk)):
        t = time.perf_counter()
        records = [EntryRecord(p, 0, 0, 0, digest, 0o644, 1000, 1000, 1_700_000_000_000_000_000, 0) for p in paths]
        index = build_index(records, 0, digest)
        stats["build_s"][order] = time.perf_counter() - t
        stats["index_bytes"] = len(index)
        del records
        tmp = blobs[order].with_suffix(".tmp")
        tmp.write_bytes(index)
        tmp.replace(blobs[order])
    tmp = stats_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    tmp.replace(stats_path)


def ensure_indexes(n: int, key: str) -> tuple[dict[str, Path], dict[str, Any], bool]:
    """The cached indexes of `n` entries (built in a child process when missing), their stats, and
    whether they came from the cache."""
    blobs, stats_path = cache_paths(n, key)
    cached = stats_path.exists() and all(p.exists() for p in blobs.values())
    if not cached:
        CACHE.mkdir(parents=True, exist_ok=True)
        for stale in CACHE.glob("index-*"):
            if not stale.stem.endswith(key):
                stale.unlink()  # another generator or builder: never valid again
        print(f"building indexes of {n:,} entries (cached afterwards in {CACHE.relative_to(REPO)})", flush=True)
        run_child(["_build", str(n), key])
    stats: dict[str, Any] = json.loads(stats_path.read_text())
    return blobs, stats, cached


# -- measuring (in a child process) ---------------------------------------------------------------


def _peak_rss() -> tuple[int, int]:
    """(VmHWM, ru_maxrss) in bytes. Only VmHWM is this process's own peak (see the module docstring)."""
    import resource  # children only: the parent stays small

    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _baseline_child() -> None:
    import blobmount.index  # noqa: F401 - what every measuring child imports

    hwm, maxrss = _peak_rss()
    print(json.dumps({"rss_bytes": hwm, "ru_maxrss_bytes": maxrss}))


def _latencies_us(fn: Any, items: list[bytes], clock: Any = time.perf_counter_ns) -> list[float]:
    out = []
    for item in items:
        t = clock()
        fn(item)
        out.append((clock() - t) / 1000)
    out.sort()
    return out


def _summary(rounds: list[list[float]], cpu_rounds: list[list[float]], preempted: int) -> dict[str, Any]:
    """Median of every wall-clock sample; each round's p99, the best of which is the one judged (a
    burst of preemption lands in one round, a slow code path in all of them); the same for rounds on
    the thread's CPU clock; involuntary context switches during the wall-clock rounds."""
    pooled = sorted(itertools.chain.from_iterable(rounds))
    p99s = [percentile(r, 0.99) for r in rounds]
    cpu_pooled = sorted(itertools.chain.from_iterable(cpu_rounds))
    return {
        "median_us": pooled[len(pooled) // 2],
        "p99_us": min(p99s),
        "p99_rounds_us": p99s,
        "cpu_median_us": cpu_pooled[len(cpu_pooled) // 2],
        "cpu_p99_us": min(percentile(r, 0.99) for r in cpu_rounds),
        "preempted": preempted,
    }


def _steal_ticks() -> int:
    """The whole machine's steal time so far (/proc/stat, in clock ticks): time the hypervisor ran
    someone else while a vCPU of ours wanted to run. Neither clock of ours can see it."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) if len(fields) > 8 else 0


def _timed_rounds(kinds: dict[str, tuple[Any, list[bytes]]], rng: random.Random) -> dict[str, dict[str, Any]]:
    """ROUNDS rounds; in each, every kind of lookup runs over its items in a fresh random order on the
    wall clock, the kinds taking turns, then again on the thread's CPU clock."""
    import resource  # children only: the parent stays small

    wall: dict[str, list[list[float]]] = {name: [] for name in kinds}
    cpu: dict[str, list[list[float]]] = {name: [] for name in kinds}
    preempted = dict.fromkeys(kinds, 0)
    for _ in range(ROUNDS):
        for name, (fn, items) in kinds.items():
            rng.shuffle(items)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
            wall[name].append(_latencies_us(fn, items))
            preempted[name] += resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - before
        for name, (fn, items) in kinds.items():
            cpu[name].append(_latencies_us(fn, items, time.thread_time_ns))
    return {name: _summary(wall[name], cpu[name], preempted[name]) for name in kinds}


def _measure_child(path: str, expected_order: str, big_files: int) -> None:
    import bisect  # children only: the parent stays small

    from blobmount.index import IndexView  # children only: the parent stays small

    t = time.perf_counter()
    buf = Path(path).read_bytes()
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    view = IndexView(buf, blob_size=0)
    open_s = time.perf_counter() - t
    if view.order.value != expected_order:
        raise SystemExit(f"{path}: IndexView found order {view.order.value}, generated {expected_order}")
    n = len(view)
    rng = random.Random(2)
    files = [view.path(rng.randrange(n)) for _ in range(LOOKUPS)]
    dirs = [p.rpartition(b"/")[0] for p in files]
    misses = [
        p + MISS_FILE_SUFFIX if i % 2 else d + b"/" + MISS_DIR_NAME
        for i, (p, d) in enumerate(zip(files, dirs, strict=True))
    ]
    for p in files:
        if view.kind(p) is None or view.kind(p) == -1:
            raise SystemExit(f"{p!r}: a stored file is not found as one")
    for p in dirs:
        if view.kind(p) != -1:
            raise SystemExit(f"{p!r}: a directory is not found as one")
    for p in misses:
        if view.kind(p) is not None:
            raise SystemExit(f"{p!r}: a miss is found")
    steal = _steal_ticks()
    lat = _timed_rounds(
        {
            "kind_file": (view.kind, files),
            "kind_dir": (view.kind, dirs),
            "kind_miss": (view.kind, misses),
            "find_hit": (view.find, files),
            "find_miss": (view.find, misses),
        },
        rng,
    )
    steal_ms = (_steal_ticks() - steal) * 1000 / os.sysconf("SC_CLK_TCK")
    t = time.perf_counter()
    listed = list(view.children(BIG_DIR))
    list_s = time.perf_counter() - t
    if len(listed) != big_files:
        raise SystemExit(f"{BIG_DIR!r}: listed {len(listed)} names, generated {big_files}")
    hwm, maxrss = _peak_rss()

    # The peer, after the RSS is taken: every key materialised, then bisect.
    key = walk_key if expected_order == "walk" else None
    t = time.perf_counter()
    keys = [view.path(i) for i in range(n)]
    if key is not None:
        keys = [key(p) for p in keys]
    peer_open_s = time.perf_counter() - t

    def peer_find(p: bytes) -> bool:
        k = key(p) if key is not None else p
        i = bisect.bisect_left(keys, k)
        return i < n and keys[i] == k

    peer = {"open_s": peer_open_s, **_timed_rounds({"find_hit": (peer_find, files)}, rng)}
    print(
        json.dumps(
            {
                "entries": n,
                "order": view.order.value,
                "index_bytes": len(buf),
                "read_s": read_s,
                "open_s": open_s,
                **lat,
                "lookups_steal_ms": steal_ms,
                "list_entries": len(listed),
                "list_s": list_s,
                "rss_bytes": hwm,
                "ru_maxrss_bytes": maxrss,
                "peer_materialised_bisect": peer,
            }
        )
    )


def run_child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.index_scale", *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed ({done.returncode}):\n{done.stderr}")
    out = done.stdout.strip()
    result: dict[str, Any] = json.loads(out) if out else {}
    return result


# -- the report -----------------------------------------------------------------------------------


def _lat(r: dict[str, Any], name: str) -> str:
    return f"{r[name]['median_us']:5.1f}/{r[name]['p99_us']:5.1f}"


def print_table(rows: list[dict[str, Any]], base_rss: int) -> None:
    mib = 2**20
    print(
        f"lookups: median/p99 us of {LOOKUPS:,} paths x {ROUNDS} rounds (median of all samples, p99 of the best"
        " round); file, dir = hits via view.kind (what the filesystem calls); miss = view.kind of a missing"
        " name (half beside a file, half a missing directory); find = view.find hit"
    )
    head = (
        f"{'entries':>9} {'order':>5} {'idx MiB':>7} {'read ms':>7} {'open ms':>8}"
        f" {'kind file':>11} {'kind dir':>11} {'kind miss':>11} {'find hit':>11}"
        f" {'list':>6} {'list ms':>7} {'us/name':>7} {'RSS MiB':>7} {'RSS-idx':>7} {'RSS/idx':>7} {'maxrss':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        idx, rss = r["index_bytes"], r["rss_bytes"]
        print(
            f"{r['entries']:>9,} {r['order']:>5} {idx / mib:>7.1f} {r['read_s'] * 1e3:>7.1f} {r['open_s'] * 1e3:>8.1f}"
            f" {_lat(r, 'kind_file'):>11} {_lat(r, 'kind_dir'):>11} {_lat(r, 'kind_miss'):>11}"
            f" {_lat(r, 'find_hit'):>11} {r['list_entries']:>6,} {r['list_s'] * 1e3:>7.1f}"
            f" {r['list_s'] * 1e6 / r['list_entries']:>7.2f} {rss / mib:>7.1f} {(rss - idx) / mib:>7.1f}"
            f" {rss / idx:>7.2f} {r['ru_maxrss_bytes'] / mib:>7.1f}"
        )
    print(
        f"RSS = the child's VmHWM; RSS-idx = RSS minus the index bytes (an interpreter with blobmount.index"
        f" imported alone peaks at {base_rss / mib:.1f} MiB); maxrss = the child's ru_maxrss, which agrees only"
        " because the parent stays small (see the module docstring)"
    )
    print()
    print(
        "noise check: the same lookups timed on the thread's CPU clock (median/p99 of the best round), which"
        " the guest's scheduler cannot inflate; involuntary context switches during the wall-clock rounds;"
        " the machine's steal time meanwhile (the hypervisor's, which inflates both clocks)"
    )
    head = (
        f"{'entries':>9} {'order':>5} "
        + " ".join(f"{k + ' cpu':>14} {'preempt':>7}" for k in LOOKUP_KINDS)
        + f" {'steal ms':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = " ".join(
            f"{r[k]['cpu_median_us']:>6.1f}/{r[k]['cpu_p99_us']:>6.1f} {r[k]['preempted']:>7}" for k in LOOKUP_KINDS
        )
        print(f"{r['entries']:>9,} {r['order']:>5} {cells} {r['lookups_steal_ms']:>8.0f}")
    print()
    print("peer in the same child: all paths materialised into a list, then bisect (what open would cost")
    print("with one Python object per entry, and the floor of a lookup in Python)")
    head = (
        f"{'entries':>9} {'order':>5} {'list open ms':>12} {'view open ratio':>15} {'bisect hit':>11}"
        f" {'find/bisect':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        p = r["peer_materialised_bisect"]
        print(
            f"{r['entries']:>9,} {r['order']:>5} {p['open_s'] * 1e3:>12.1f} {r['open_s'] / p['open_s']:>15.2f}"
            f" {p['find_hit']['median_us']:>5.1f}/{p['find_hit']['p99_us']:>5.1f}"
            f" {r['find_hit']['median_us'] / p['find_hit']['median_us']:>11.1f}"
        )


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target against each row it applies to, with the measured value's ratio to the limit."""
    out: list[dict[str, Any]] = []

    def check(row: dict[str, Any], target: str, value: float, limit: float, unit: str) -> None:
        out.append(
            {
                "entries": row["entries"],
                "order": row["order"],
                "target": target,
                "value": value,
                "limit": limit,
                "unit": unit,
                "ratio": value / limit,
                "met": value < limit,
            }
        )

    for r in rows:
        if r["entries"] >= TARGET_OPEN_ENTRIES:
            check(r, f"open of {TARGET_OPEN_ENTRIES:,} entries", r["open_s"], TARGET_OPEN_S, "s")
        for name in LOOKUP_KINDS:
            check(r, f"{name} median", r[name]["median_us"], TARGET_LOOKUP_US, "us")
            check(r, f"{name} p99 (best round)", r[name]["p99_us"], TARGET_LOOKUP_US, "us")
        over_mb = (r["rss_bytes"] - r["index_bytes"]) / 1e6
        check(r, "RSS - index bytes", over_mb, TARGET_RSS_OVER_INDEX_BYTES / 1e6, "MB")
    return out


def print_verdicts(checks: list[dict[str, Any]]) -> None:
    print()
    print(
        f"targets: open of 1M < {TARGET_OPEN_S:g} s; lookup < {TARGET_LOOKUP_US:g} us;"
        f" RSS < index bytes + {TARGET_RSS_OVER_INDEX_BYTES / 1e6:g} MB (ratio = measured / limit; < 1 is met)"
    )
    by_target: dict[str, list[dict[str, Any]]] = {}
    for c in checks:
        by_target.setdefault(c["target"], []).append(c)
    for target, cs in by_target.items():
        worst = max(cs, key=lambda c: c["ratio"])
        missed = [c for c in cs if not c["met"]]
        state = "met" if not missed else f"MISSED in {len(missed)} of {len(cs)}"
        print(
            f"  {target:<30} worst {worst['value']:9.3f} {worst['unit']:<2} ({worst['entries']:,} {worst['order']})"
            f"  ratio {worst['ratio']:5.2f}  {state}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_build":
        _build_child(int(argv[1]), argv[2])
        return 0
    if argv and argv[0] == "_measure":
        _measure_child(argv[1], argv[2], int(argv[3]))
        return 0
    if argv and argv[0] == "_baseline":
        _baseline_child()
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.index_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="entry counts (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK_SIZES[0]:,} entries (a smoke run)")
    ap.add_argument(
        "--json", nargs="?", type=Path, const=AUTO_JSON, default=None, metavar="OUT",
        help="write the results as JSON (default OUT: bench/results/<date>-index_scale[-quick].json)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.json == AUTO_JSON:
        args.json = default_json_path("index_scale-quick" if args.quick else "index_scale")
    sizes = list(QUICK_SIZES) if args.quick else [int(s) for s in args.sizes.split(",")]
    if any(n < 2 for n in sizes):
        raise SystemExit("--sizes: at least 2 entries each")
    info, info_line = machine()
    code = code_state()
    print(info_line)
    print(f"blobmount code: {code}; load average {loadavg()}", flush=True)
    key = cache_key()
    base = run_child(["_baseline"])
    rows: list[dict[str, Any]] = []
    datasets: list[dict[str, Any]] = []
    for n in sizes:
        blobs, stats, cached = ensure_indexes(n, key)
        datasets.append({**stats, "cached": cached})
        built = "from cache" if cached else "built " + ", ".join(f"{o} {s:.1f} s" for o, s in stats["build_s"].items())
        print(
            f"{n:,} entries: mean path {stats['mean_path_bytes']:.1f} B (max {stats['max_path_bytes']}),"
            f" {stats['directories']:,} directories with files, {stats['order_disagreements']:,} adjacent pairs"
            f" ordered differently by walk order, {stats['index_bytes'] / 2**20:.1f} MiB; {built}",
            flush=True,
        )
        for order in ORDERS:
            rows.append(run_child(["_measure", str(blobs[order]), order, str(stats["big_dir_files"])]))
    print()
    print_table(rows, base["rss_bytes"])
    checks = verdicts(rows)
    print_verdicts(checks)
    load_after = loadavg()
    print(f"load average after: {load_after}")
    if args.json is not None:
        write_json(
            args.json,
            {
                "bench": "index_scale",
                "machine": info,
                "code": code,
                "load_average_after": load_after,
                "lookups_per_kind": LOOKUPS,
                "lookup_rounds": ROUNDS,
                "baseline_rss_bytes": base["rss_bytes"],
                "datasets": datasets,
                "rows": rows,
                "targets": checks,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
