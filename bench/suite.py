"""The benchmark suite: blobmount beside its peers and the physical limits, in one run.

    python -m bench [--quick] [--reps 3] [--delay-ms 10] [--rate 1gbit] [--networks local,loopback,netns]

Sets up what it needs (bench.setup), builds or reuses the datasets (bench.datasets), then for each
network -- ``local`` (plain files, blobmount over a local archive directory, squashfuse, ratarmount),
``loopback`` and ``netns`` (docker-registry and nginx on 127.0.0.1, then inside the netshape
namespace: curl limits, blobmount over the registry, rclone mount over nginx with
--vfs-cache-mode full and off, httpfs2) -- runs every workload (bench.workloads) on every peer,
cold (page cache dropped, fresh mount, empty cache directory) then warm (again, same mount), and for
peers that keep a disk cache once more after a remount. Peers take turns within a repetition, so
drift and the neighbours' load hit them alike. Then the scale curves (bench.scale, and
bench.index_scale without FUSE), create-vs-tar (bench.create_throughput), and in full runs a 10 GiB
blob over the shaped link. Writes bench/results/<date>.json, <date>.md (ratios to the best peer and
to the limit, per workload; the issues' targets) and PNG plots; bench/results/latest.md is a copy
of the newest full table.

A run that takes longer than ``--run-timeout`` is killed and recorded as a timeout; a peer whose cold
run of a workload took over ``--slow-s`` gets that workload once, not ``--reps`` times (rclone
reading 24,000 files one by one over a 10 ms link). Every process it starts is stopped by PID, every
mount unmounted, the namespace torn down, also after a crash (the next run clears the leftovers).
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import create_throughput, datasets, index_scale, report, scale, setup, workloads
from bench._common import cleanup_on_term, code_state, drop_caches, first_line, loadavg, machine, write_json
from bench.janitor import WORK_ROOT, Janitor, fresh_dir
from bench.peers import LOCAL, Mounter, Peer, blobmount_cmd, local_peers, registry_ref, remote_peers
from bench.servers import (
    NS_IP,
    NS_NGINX_PORT,
    NS_REGISTRY_PORT,
    AccessLog,
    Netshape,
    Server,
    Traffic,
    free_port,
    manifest_layers,
    netshape_down_locked,
    rtt_s,
    start_nginx,
    start_registry,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
NETWORKS = ("local", "loopback", "netns")
REMOUNT_WORKLOADS = ("readall_p8", "seq")  # re-read after a remount: what a persistent cache is for
HUGE_BYTES = 10 << 30
HUGE_DISK_NEEDED = 3 * HUGE_BYTES + (4 << 30)  # the archive, the registry's copy, a full cache, margin
CURL_STREAMS = 8
TTFB_READ_LIMIT_BYTES = 64 << 10  # after the first byte, read on to 64 KiB (httpfs2's probe is big.bin)
RUN_LOCK = WORK_ROOT.with_name(WORK_ROOT.name + ".lock")  # one suite per work root
SCALE_TIMEOUT_S = 900.0  # find over a 1M-entry mount takes minutes, not seconds


@dataclass
class Ctx:
    args: argparse.Namespace
    janitor: Janitor
    work: Path
    mounter: Mounter
    data: dict[str, datasets.Dataset]
    records: list[dict[str, Any]] = field(default_factory=list)
    skip: dict[tuple[str, ...], str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:.0f} s into the run"

    def record(self, peer: str, network: str, ds: str, wl: str, phase: str, rep: int, **kw: Any) -> None:
        row = {"network": network, "dataset": ds, "workload": wl, "peer": peer, "phase": phase, "rep": rep}
        row.update({"status": "ok", **kw})
        self.records.append(row)
        secs = kw.get("seconds")
        shown = f"{secs:9.3f} s" if isinstance(secs, float) else f"{row['status']:>11}"
        extra = ""
        if kw.get("fetched_bytes") is not None:
            extra = f"  fetched {kw['fetched_bytes'] / 2**20:8.1f} MiB in {kw.get('requests')} requests"
        print(f"  {network:<8} {ds}/{wl:<11} {phase:<7} {peer:<14} rep {rep}: {shown}{extra}", flush=True)


def _traffic(t: Traffic | None) -> dict[str, Any]:
    if t is None:
        return {}
    return {"fetched_bytes": t.bytes, "requests": t.requests, "blob_requests": t.blob_requests}


def _log_for(ctx: Ctx, peer: Peer) -> AccessLog | None:
    if peer.network == LOCAL:
        return None
    registry, nginx = ctx.mounter.servers[peer.network]
    return registry.log if peer.is_blobmount else nginx.log


# -- one peer, one workload, one repetition ----------------------------------------------------------


def run_ready(ctx: Ctx, peer: Peer, ds: datasets.Dataset, rep: int) -> None:
    """Mount-ready, then time to first byte of one small file: cold (fresh cache, dropped page
    cache) and warm (remount over the kept cache, page cache kept)."""
    log = _log_for(ctx, peer)
    timeout = ctx.args.run_timeout
    for phase in ("cold", "warm"):
        if phase == "cold":
            drop_caches()
        mark = log.mark() if log else 0
        with ctx.mounter.mount(peer, ds, fresh_cache=phase == "cold") as m:
            at_ready = _traffic(log.since(mark)) if log else {}
            mark = log.mark() if log else 0
            target = m.root / ("big.bin" if peer.kind == "httpfs2" else ds.probe)
            p = workloads.probe(["ttfb", str(target), str(TTFB_READ_LIMIT_BYTES)], timeout)
            read_traffic = _traffic(log.since(mark)) if log else {}
            rss = m.peak_rss()
        if peer.mounts:
            ctx.record(peer.name, peer.network, ds.name, "ready", phase, rep, seconds=m.ready_s, rss_bytes=rss,
                       **at_ready)  # fmt: skip
        ctx.record(peer.name, peer.network, ds.name, "ttfb", phase, rep, seconds=p["ttfb_s"], whole_s=p["whole_s"],
                   bytes_read=p["bytes"], path=str(target.relative_to(m.root)), **read_traffic)  # fmt: skip


def run_workload(ctx: Ctx, peer: Peer, ds: datasets.Dataset, wl: str, rep: int) -> None:
    key = (peer.network, peer.name, ds.name, wl)
    if key in ctx.skip:
        return
    timeout = ctx.args.run_timeout
    log = _log_for(ctx, peer)
    try:
        if wl == "ready":
            run_ready(ctx, peer, ds, rep)
            return
        drop_caches()
        with ctx.mounter.mount(peer, ds) as m:
            for phase in ("cold", "warm"):
                mark = log.mark() if log else 0
                out = workloads.run(wl, m.root, ds, timeout)
                ctx.record(peer.name, peer.network, ds.name, wl, phase, rep, seconds=out.seconds,
                           bytes_read=out.bytes_read, rss_bytes=m.peak_rss(), mount_ready_s=m.ready_s,
                           **_traffic(log.since(mark) if log else None), **out.extra)  # fmt: skip
                if phase == "cold" and out.seconds > ctx.args.slow_s and rep == 0 and ctx.args.reps > 1:
                    ctx.skip[key] = (
                        f"cold run took {out.seconds:.0f} s > --slow-s {ctx.args.slow_s:.0f}: one repetition"
                    )
        if peer.persistent_cache and wl in REMOUNT_WORKLOADS:
            drop_caches()
            with ctx.mounter.mount(peer, ds, fresh_cache=False) as m:
                mark = log.mark() if log else 0
                out = workloads.run(wl, m.root, ds, timeout)
                ctx.record(peer.name, peer.network, ds.name, wl, "remount", rep, seconds=out.seconds,
                           bytes_read=out.bytes_read, rss_bytes=m.peak_rss(), mount_ready_s=m.ready_s,
                           **_traffic(log.since(mark) if log else None))  # fmt: skip
    except workloads.RunTimeout as e:
        ctx.skip[key] = f"timeout: {e}"
        ctx.record(peer.name, peer.network, ds.name, wl, "cold", rep, status="timeout", seconds=None,
                   limit_s=timeout)  # fmt: skip
    except (RuntimeError, OSError) as e:
        ctx.skip[key] = f"error: {e}"
        ctx.record(peer.name, peer.network, ds.name, wl, "cold", rep, status="error", seconds=None,
                   error=str(e)[-2000:])  # fmt: skip


def workloads_of(ds: str) -> tuple[str, ...]:
    return ("ready", *(workloads.TREE_WORKLOADS if ds == "tree" else workloads.BIG_WORKLOADS))


def run_peers(ctx: Ctx, peers: list[Peer], network: str) -> None:
    for rep in range(ctx.args.reps):
        print(f"{network}: repetition {rep + 1}/{ctx.args.reps}, load {loadavg()}, {ctx.elapsed()}", flush=True)
        if network != LOCAL:
            run_limits(ctx, network, rep)
        for ds_name in ("tree", "big"):
            ds = ctx.data[ds_name]
            for wl in workloads_of(ds_name):
                for peer in peers:
                    if peer.serves(ds_name, wl):
                        run_workload(ctx, peer, ds, wl, rep)


# -- the limits of a network ---------------------------------------------------------------------------


def run_limits(ctx: Ctx, network: str, rep: int) -> None:
    """curl of each whole data blob, 8 parallel range curls of the big one, and 2,000 4 KiB range
    GETs on one keep-alive connection, from the same registry the blobmount peer reads."""
    registry, _ = ctx.mounter.servers[network]
    timeout = ctx.args.run_timeout
    blobs = ctx.info["blobs"]
    big = ctx.data["big"]
    big_blob = blobs["big"]["data"]
    base = f"http://{registry.addr}/v2/bench"
    try:
        drop_caches()
        secs, size = workloads.curl_whole(f"{base}/tree/blobs/{blobs['tree']['data']['digest']}", timeout)
        for wl in ("readall_p8", "readall_p1"):
            ctx.record("curl", network, "tree", wl, "cold", rep, seconds=secs, bytes_read=size,
                       note="curl of the whole tree data blob")  # fmt: skip
        drop_caches()
        url = f"{base}/big/blobs/{big_blob['digest']}"
        secs, size = workloads.curl_whole(url, timeout)
        seq_bytes = (big.plain / "big.bin").stat().st_size
        par_bytes = sum(p.stat().st_size for p in (big.plain / "par").iterdir())
        for wl, want in (("seq", seq_bytes), ("par8", par_bytes)):
            ctx.record("curl", network, "big", wl, "cold", rep, seconds=secs * want / size, bytes_read=want,
                       raw_seconds=secs, raw_bytes=size, note="curl of the whole big data blob, scaled")  # fmt: skip
        drop_caches()
        secs = workloads.curl_ranges(url, size, CURL_STREAMS, timeout)
        for wl, want in (("seq", seq_bytes), ("par8", par_bytes)):
            ctx.record(f"curl-{CURL_STREAMS}", network, "big", wl, "cold", rep, seconds=secs * want / size,
                       bytes_read=want, raw_seconds=secs, raw_bytes=size,
                       note=f"{CURL_STREAMS} parallel range curls of the big data blob, scaled")  # fmt: skip
        drop_caches()
        r = workloads.probe(
            ["httprand", registry.host, str(registry.port), f"/v2/bench/big/blobs/{big_blob['digest']}",
             str(size), str(workloads.RAND_READS), str(workloads.RAND_SEED)], timeout)  # fmt: skip
        ctx.record("http-range", network, "big", "rand4k", "cold", rep, seconds=r["seconds"], bytes_read=r["bytes"],
                   note="4 KiB range GETs, one keep-alive connection")  # fmt: skip
    except (workloads.RunTimeout, RuntimeError) as e:
        ctx.record("curl", network, "big", "seq", "cold", rep, status="error", seconds=None, error=str(e))


# -- networks ---------------------------------------------------------------------------------------


def push_archives(ctx: Ctx, registry: Server) -> None:
    for name, ds in ctx.data.items():
        ref = registry_ref(registry, name)
        t = time.monotonic()
        subprocess.run([*blobmount_cmd(), "push", "--archive", str(ds.archive), ref], check=True, capture_output=True)
        index, data = manifest_layers(registry, f"bench/{name}", "v1")
        ctx.info.setdefault("blobs", {})[name] = {
            "index": {"digest": index.digest, "size": index.size},
            "data": {"digest": data.digest, "size": data.size},
            "push_s": time.monotonic() - t,
        }


def network_info(ctx: Ctx, network: str, registry: Server) -> None:
    version_s = min(_timed([*blobmount_cmd(), "--version"]) for _ in range(5))
    ctx.info.setdefault("networks", {})[network] = {
        "rtt_s": rtt_s(registry.host, registry.port, "/v2/"),
        "blobmount_version_s": version_s,
    }
    print(f"{network}: RTT {ctx.info['networks'][network]['rtt_s'] * 1e3:.2f} ms", flush=True)


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def run_huge(ctx: Ctx, registry: Server) -> None:
    """One 10 GiB raw file: local cat of the data blob, blobmount over the directory, curl of the
    blob and blobmount over the registry, through the shaped link; one cold run each."""
    free = shutil.disk_usage(ctx.work).free
    if free < HUGE_DISK_NEEDED:
        reason = f"skipped: {free / 2**30:.0f} GiB free in {ctx.work}, the 10 GiB run needs {HUGE_DISK_NEEDED >> 30}"
        print(f"10 GiB blob: {reason}", flush=True)
        ctx.info["huge"] = reason
        return
    src = ctx.data["big"].plain / "big.bin"
    tree = ctx.work / "huge-src"
    arc = ctx.work / "huge-arc"
    tree.mkdir()
    chunk = src.read_bytes()
    with open(tree / "big.bin", "wb") as f:
        for _ in range(HUGE_BYTES // len(chunk)):
            f.write(chunk)
        f.write(chunk[: HUGE_BYTES % len(chunk)])
    subprocess.run([*blobmount_cmd(), "create", "--no-progress", "--compression", "none", str(tree), str(arc)],
                   check=True, capture_output=True)  # fmt: skip
    shutil.rmtree(tree)  # the data blob of one raw file is that file's bytes: the plain peer reads it
    huge = datasets.Dataset("huge", arc, arc, arc, arc, 1, HUGE_BYTES, "big.bin", f"{src.name} repeated to 10 GiB")
    ref = registry_ref(registry, "huge")
    loop_registry, _ = ctx.mounter.servers["loopback"]
    subprocess.run([*blobmount_cmd(), "push", "--archive", str(arc), registry_ref(loop_registry, "huge")],
                   check=True, capture_output=True)  # fmt: skip
    _, data = manifest_layers(registry, "bench/huge", "v1")
    timeout = max(ctx.args.run_timeout, 1800.0)
    results: dict[str, Any] = {"bytes": HUGE_BYTES, "ref": ref}
    try:
        drop_caches()
        secs, _ = workloads.run_child([f"cat {arc}/data.blob > /dev/null"], timeout, shell=True)
        results["plain_cat_s"] = secs
        for peer in (
            Peer("blobmount-dir", "blobmount-dir", LOCAL),
            Peer("blobmount-reg", "blobmount-registry", "netns"),
        ):
            drop_caches()
            with ctx.mounter.mount(peer, huge) as m:
                out = workloads.run("seq", m.root, huge, timeout)
                results[f"{peer.name}_s"] = out.seconds
                results[f"{peer.name}_rss_bytes"] = m.peak_rss()
        drop_caches()
        secs, _ = workloads.curl_whole(f"http://{registry.addr}/v2/bench/huge/blobs/{data.digest}", timeout)
        results["curl_netns_s"] = secs
    except (workloads.RunTimeout, RuntimeError) as e:
        results["error"] = str(e)
    finally:
        shutil.rmtree(arc, ignore_errors=True)
        ctx.mounter.drop_cache_dirs()
    ctx.info["huge"] = results
    print(f"10 GiB blob: {results}", flush=True)


def run_network(ctx: Ctx, network: str, storage: Path) -> None:
    args = ctx.args
    peers = remote_peers(network, with_rclone=not args.quick or args.all_peers)
    peers = [p for p in peers if not args.peers or p.name in args.peers]
    if network == "loopback":
        registry, nginx = ctx.mounter.servers["loopback"]
        network_info(ctx, network, registry)
        run_peers(ctx, peers, network)
        return
    with Netshape(ctx.janitor, args.delay_ms, args.rate):
        registry = start_registry(ctx.janitor, ctx.work, storage, NS_IP, NS_REGISTRY_PORT, netns=True)
        nginx = start_nginx(ctx.janitor, ctx.work, ctx.data["tree"].plain.parent, NS_IP, NS_NGINX_PORT, netns=True)
        ctx.mounter.servers["netns"] = (registry, nginx)
        try:
            network_info(ctx, network, registry)
            run_peers(ctx, peers, network)
            if not args.quick and not args.skip_huge:
                run_huge(ctx, registry)
        finally:
            ctx.janitor.stop(nginx.proc)
            ctx.janitor.stop(registry.proc)
            del ctx.mounter.servers["netns"]


def run_scale(ctx: Ctx) -> None:
    sizes = scale.SIZES_QUICK if ctx.args.quick else scale.SIZES_FULL
    flat = scale.FLAT_QUICK if ctx.args.quick else scale.FLAT_FULL
    out: list[dict[str, Any]] = []
    for kind, n in [*(("tree", n) for n in sizes), ("flat", flat)]:
        print(f"scale: {kind} {n:,} entries, load {loadavg()}", flush=True)
        try:
            timeout = max(ctx.args.run_timeout, SCALE_TIMEOUT_S)
            out.append(scale.measure(ctx.mounter, kind, n, ctx.args.reps, timeout))
        except (workloads.RunTimeout, RuntimeError) as e:
            out.append({"kind": kind, "entries": n, "error": str(e)})
            ctx.records.append({"network": LOCAL, "dataset": f"scale-{kind}-{n}", "workload": "scale",
                                "peer": "blobmount-dir", "phase": "cold", "rep": 0, "status": "error",
                                "seconds": None, "error": str(e)})  # fmt: skip
    ctx.info["scale"] = out


def run_sub_benchmarks(ctx: Ctx) -> None:
    """bench.index_scale (the index without FUSE) and, in full runs, bench.create_throughput, their
    JSON embedded."""
    subs = [("index_scale", index_scale.main)]
    if not ctx.args.quick:  # create vs tar is not what a smoke run needs to keep working
        subs.append(("create_throughput", create_throughput.main))
    for name, main in subs:
        path = ctx.work / f"{name}.json"
        print(f"=== bench.{name}{' --quick' if ctx.args.quick else ''}", flush=True)
        status = main([*(["--quick"] if ctx.args.quick else []), "--json", str(path)])
        if status:
            raise RuntimeError(f"bench.{name} exited {status}")
        ctx.info[name] = json.loads(path.read_text())


# -- main ------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small data, local + loopback, 1 repetition")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--delay-ms", type=int, default=10, help="netshape delay per round trip (default 10)")
    ap.add_argument("--rate", default="1gbit", help="netshape rate cap (tc tbf syntax, default 1gbit)")
    ap.add_argument(
        "--networks", default=None, help="comma list of local,loopback,netns (default all; quick: local,loopback)"
    )
    ap.add_argument("--peers", default=None, help="comma list of peer names to run (default all)")
    ap.add_argument("--all-peers", action="store_true", help="with --quick, also rclone and ratarmount")
    ap.add_argument("--no-install", action="store_true", help="check for the tools, never install (CI)")
    ap.add_argument("--no-scale", action="store_true", help="skip the scale curves and the sub-benchmarks")
    ap.add_argument("--skip-huge", action="store_true", help="skip the 10 GiB blob (full runs only)")
    ap.add_argument("--run-timeout", type=float, default=300.0, help="seconds one workload run may take (default 300)")
    ap.add_argument(
        "--slow-s", type=float, default=60.0, help="a cold run slower than this is not repeated (default 60)"
    )
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")  # fmt: skip
    args = ap.parse_args(argv)
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    if not 1 <= args.reps <= 20:
        ap.error("--reps: 1..20")
    nets = args.networks or ("local,loopback" if args.quick else ",".join(NETWORKS))
    args.networks = [n for n in nets.split(",") if n]
    if bad := [n for n in args.networks if n not in NETWORKS]:
        ap.error(f"unknown networks {bad}")
    args.peers = set(args.peers.split(",")) if args.peers else set()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        raise SystemExit("the suite needs root (drop_caches, mounts, network namespaces, apt)")
    mode = "quick" if args.quick else "full"
    full_peers = not args.quick or args.all_peers
    tools = dict(setup.FULL_TOOLS if full_peers else setup.QUICK_TOOLS)
    if "netns" in args.networks:
        tools.update(setup.NETNS_TOOLS)
    if not args.quick:
        tools.update(setup.FULL_TOOLS)
    setup.ensure(tools, setup.FULL_MODULES if full_peers else setup.QUICK_MODULES, install=not args.no_install)

    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    run_lock = os.open(RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(run_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another benchmark suite holds {RUN_LOCK}") from None
    janitor = Janitor(WORK_ROOT)
    for line in janitor.recover(lambda: netshape_down_locked(janitor)):
        print(f"recovered: {line}", flush=True)
    work = WORK_ROOT / "run"
    fresh_dir(work)
    janitor.save()
    started = time.monotonic()
    failed = False
    with cleanup_on_term():
        try:
            info, info_line = machine()
            code_before = code_state()
            print(info_line)
            print(f"blobmount code: {code_before}; load average {loadavg()}", flush=True)
            data, build = datasets.ensure(mode, with_tar=full_peers)
            mounter = Mounter(janitor, work)
            ctx = Ctx(args, janitor, work, mounter, data)
            ctx.info.update({"datasets": {k: v.to_json() for k, v in data.items()}, "dataset_build": build})
            loads = [loadavg()]
            if "local" in args.networks:
                peers = [p for p in local_peers(full_peers) if not args.peers or p.name in args.peers]
                run_peers(ctx, peers, LOCAL)
                loads.append(loadavg())
            remote = [n for n in args.networks if n != "local"]
            if remote:
                storage = work / "registry-storage"
                registry = start_registry(janitor, work, storage, "127.0.0.1", free_port(), netns=False)
                nginx = start_nginx(janitor, work, data["tree"].plain.parent, "127.0.0.1", free_port(), netns=False)
                mounter.servers["loopback"] = (registry, nginx)
                push_archives(ctx, registry)
                for network in remote:
                    run_network(ctx, network, storage)
                    loads.append(loadavg())
            if not args.no_scale:
                run_scale(ctx)
                run_sub_benchmarks(ctx)
            code_after = code_state()
            doc = {
                "suite": "blobmount bench",
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
                "quick": args.quick,
                "params": {
                    "reps": args.reps,
                    "delay_ms": args.delay_ms,
                    "rate": args.rate,
                    "networks": args.networks,
                    "run_timeout_s": args.run_timeout,
                    "slow_s": args.slow_s,
                },
                "machine": info,
                "versions": versions(),
                "code": {"before": code_before, "after": code_after},
                "load_average": [*loads, loadavg()],
                "total_s": time.monotonic() - started,
                "mounts": mounter.count,
                "skipped": {"/".join(k): v for k, v in ctx.skip.items()},
                **ctx.info,
                "records": ctx.records,
            }
            out_dir = args.out or RESULTS
            stem = datetime.date.today().isoformat() + ("-quick" if args.quick else "")
            doc["summary"] = report.summarize(doc)
            doc["targets"] = report.targets(doc)
            plots = report.plots(doc, out_dir, stem)
            doc["plots"] = [p.name for p in plots]
            md = report.markdown(doc, plots)
            write_json(out_dir / f"{stem}.json", doc)
            (out_dir / f"{stem}.md").write_text(md)
            print(f"wrote {out_dir / (stem + '.md')}")
            if not args.quick and args.out is None:
                (out_dir / "latest.md").write_text(md)
            print()
            print(md)
            errors = [r for r in ctx.records if r["status"] == "error" or (args.quick and r["status"] == "timeout")]
            if errors:
                failed = True
                print(f"{len(errors)} run(s) failed; see the records' `error` fields", file=sys.stderr)
        finally:
            janitor.stop_all()
            os.close(run_lock)
    if not failed:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work / 'logs'}", file=sys.stderr)
    return 1 if failed else 0


def versions() -> dict[str, str]:
    return {
        "blobmount": first_line([*blobmount_cmd(), "--version"], "blobmount"),
        "squashfuse": first_line(["squashfuse", "--version"], "squashfuse"),
        "rclone": first_line(["rclone", "version"], "rclone"),
        "httpfs2": first_line(["httpfs2"], "Version"),
        "ratarmount": first_line([str(Path(sys.executable).with_name("ratarmount")), "--version"], "ratarmount"),
        "nginx": first_line(["nginx", "-v"], "nginx"),
        "docker-registry": first_line(["/usr/bin/docker-registry", "--version"], "registry"),
        "curl": first_line(["curl", "--version"], "curl"),
        "git": first_line(["git", "--version"], "git"),
    }
