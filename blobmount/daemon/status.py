"""`blobmount status MNT`: asks the daemon over its control socket and prints the answer for people
(a summary) or programs (``--json``, the keys a test holds unchanged).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from blobmount.daemon.control import find_daemon
from blobmount.errors import EXIT_OK


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def summary(st: dict[str, Any]) -> str:
    """The human form of a status answer: one fact per line."""
    cache, fetched, served = st["cache"], st["fetched"], st["served"]
    rate = f"{cache['hit_rate'] * 100:.1f}%" if cache["hit_rate"] is not None else "-"
    ratio = f", {fetched['coalescing_ratio']} chunks/request" if fetched["coalescing_ratio"] else ""
    lines = [
        (
            "mountpoint",
            f"{st['mountpoint']} ({'ready' if st['ready'] else 'NOT ready'}, pid {st['pid']}, "
            f"up {_duration(st['uptime_s'])}, blobmount {st['version']})",
        ),
        ("source", st["source"]),
        ("pinned", st["pinned"]),
        ("index", st["index_digest"]),
        ("data", f"{st['data_digest'] or '-'} ({_size(st['data_size_bytes'])}, {st['entries']} entries)"),
        ("cache", f"{_size(cache['used_bytes'])} of {_size(cache['limit_bytes'])} in {cache['dir']}"),
        ("hit rate", f"{rate} ({cache['hits']} hits, {cache['misses']} misses, {cache['evictions']} evictions)"),
        (
            "fetched",
            f"{_size(fetched['http_bytes'])} in {fetched['http_requests']} HTTP requests "
            f"({fetched['retries']} retries{ratio})",
        ),
        (
            "served",
            f"{_size(served['read_bytes'])} read, {served['fuse_requests']} FUSE requests "
            f"({served['fuse_errors']} errors)",
        ),
        ("metrics", st["metrics_url"] or "off (--metrics ADDR)"),
    ]
    follow = st.get("follow")
    if follow:
        extra = f", refused {follow['refused']}" if follow.get("refused") else ""
        extra += f", waiting for {follow['waiting']}" if follow.get("waiting") else ""
        lines.insert(
            3,
            (
                "follow",
                f"every {follow['interval_s']:g} s, {follow['switches']} switches, {follow['checks']} checks" + extra,
            ),
        )
    return "\n".join(f"{key:11}{value}" for key, value in lines)


def status_command(mountpoint: str, *, json_out: bool = False, socket_path: Path | None = None) -> int:
    _, st = find_daemon(mountpoint, socket_path)
    if json_out:
        print(json.dumps(st, indent=2))
    else:
        print(summary(st))
    sys.stdout.flush()
    return EXIT_OK
