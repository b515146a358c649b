"""``python -m bench.metrics_choice [--updates N]``: the hand-written exposition (blobmount.daemon.metrics)
beside prometheus_client doing the same work, in one process, to decide which the daemon uses.

What the daemon pays for its metrics, measured for both:
- import: the first import in a fresh interpreter (``python -X importtime``'s cumulative figure),
  paid by every mount before it is ready;
- update: one FUSE request's worth of updates (a labelled counter increment and a labelled
  histogram observation), paid on the trio thread for every request;
- render: one scrape of a registry shaped like the daemon's (its metric names, one series per
  FUSE operation and a latency histogram per operation).
Prints one line per figure, blobmount's figure, prometheus_client's and their ratio.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

OPS = ("lookup", "getattr", "readdirplus", "open", "read", "release", "getxattr", "statfs")


def import_us(module: str, reps: int = 5) -> float:
    """Median cumulative import time of `module` in a fresh interpreter, microseconds."""
    times = []
    for _ in range(reps):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=True
        ).stderr
        last = [line for line in out.splitlines() if re.search(rf"\|\s*{re.escape(module)}$", line)][-1]
        times.append(float(last.split("|")[1]))
    return statistics.median(times)


def _discard(_: object) -> None:
    pass


def per_call_ns(fn: Callable[[], None], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def ours(n: int) -> tuple[float, float]:
    from blobmount.daemon import metrics

    for i, op in enumerate(OPS * 50):
        metrics.FUSE_REQUESTS.labels(op=op).inc()
        metrics.FUSE_LATENCY.labels(op=op).observe(i * 1e-5)

    def update() -> None:
        metrics.FUSE_REQUESTS.labels(op="read").inc()
        metrics.FUSE_LATENCY.labels(op="read").observe(0.0003)

    return per_call_ns(update, n), per_call_ns(lambda: _discard(metrics.render()), max(n // 1000, 20))


def theirs(n: int) -> tuple[float, float]:
    import prometheus_client as pc
    from prometheus_client import CollectorRegistry

    from blobmount.daemon import metrics

    registry = CollectorRegistry()
    counter = pc.Counter("blobmount_fuse_requests", "FUSE requests", ["op"], registry=registry)
    hist = pc.Histogram(
        "blobmount_fuse_request_seconds", "latency", ["op"], buckets=metrics.LATENCY_BUCKETS_S, registry=registry
    )
    for m in metrics.REGISTRY:  # the rest of the daemon's series, as plain gauges
        if m.name not in ("blobmount_fuse_requests_total", "blobmount_fuse_request_seconds"):
            pc.Gauge(m.name.removesuffix("_total") + "_g", m.doc, registry=registry)
    for i, op in enumerate(OPS * 50):
        counter.labels(op=op).inc()
        hist.labels(op=op).observe(i * 1e-5)

    def update() -> None:
        counter.labels(op="read").inc()
        hist.labels(op="read").observe(0.0003)

    return per_call_ns(update, n), per_call_ns(lambda: _discard(pc.generate_latest(registry)), max(n // 1000, 20))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--updates", type=int, default=200_000)
    args = p.parse_args(argv)
    ours_import, their_import = import_us("blobmount.daemon.metrics"), import_us("prometheus_client")
    (ours_update, ours_render), (their_update, their_render) = ours(args.updates), theirs(args.updates)
    rows = [
        ("import, ms", ours_import / 1000, their_import / 1000),
        ("update per FUSE request, us", ours_update / 1000, their_update / 1000),
        ("render one scrape, ms", ours_render / 1e6, their_render / 1e6),
    ]
    print(f"{'figure':32s} {'blobmount.daemon.metrics':>18s} {'prometheus_client':>18s} {'ratio':>7s}")
    for name, a, b in rows:
        print(f"{name:32s} {a:18.3f} {b:18.3f} {a / b:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
