"""Measurements that must run in a child process, each timing itself and printing one JSON line.

A read from a FUSE mount whose daemon hangs blocks in the kernel and cannot be interrupted from
inside the process; in a child it can be killed (the suite kills the child's whole process group on
its timeout, then unmounts). The child times only the operation, not its own start-up.

    python -m bench.probe ttfb PATH LIMIT        # open + first byte, then on to LIMIT bytes: both times
    python -m bench.probe randread PATH N SEED   # N preads of 4 KiB at 4 KiB-aligned random offsets
    python -m bench.probe stat ROOT LISTFILE      # os.stat of each relative path in LISTFILE
    python -m bench.probe listdir PATH           # one full listing of a directory
    python -m bench.probe httprand HOST PORT PATH SIZE N SEED   # N 4 KiB range GETs, one connection
"""

from __future__ import annotations

import http.client
import json
import os
import random
import sys
import time

BLOCK_BYTES = 4096


def _random_offsets(size: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    blocks = max(size // BLOCK_BYTES, 1)
    return [rng.randrange(blocks) * BLOCK_BYTES for _ in range(count)]


def ttfb(path: str, limit: int) -> dict[str, float | int]:
    """Open, read one byte (the time to first byte), then read on to EOF or `limit` bytes."""
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        first = f.read(1)
        first_s = time.perf_counter() - t
        rest = 0
        while rest + len(first) < limit and (chunk := f.read(min(1 << 20, limit - rest - len(first)))):
            rest += len(chunk)
    return {"ttfb_s": first_s, "whole_s": time.perf_counter() - t, "bytes": len(first) + rest}


def randread(path: str, count: int, seed: int) -> dict[str, float | int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        offsets = _random_offsets(os.fstat(fd).st_size, count, seed)
        t = time.perf_counter()
        got = 0
        for off in offsets:
            got += len(os.pread(fd, BLOCK_BYTES, off))
        elapsed = time.perf_counter() - t
    finally:
        os.close(fd)
    return {"seconds": elapsed, "bytes": got, "reads": count}


def stat_paths(root: str, listfile: str) -> dict[str, object]:
    with open(listfile) as f:
        paths = [os.path.join(root, line.rstrip("\n")) for line in f if line.strip()]
    lat = []
    missing = 0
    for p in paths:
        t = time.perf_counter_ns()
        try:
            os.stat(p)
        except FileNotFoundError:
            missing += 1
        lat.append((time.perf_counter_ns() - t) / 1000)
    return {"latencies_us": lat, "missing": missing}


def listdir(path: str) -> dict[str, float | int]:
    t = time.perf_counter()
    names = os.listdir(path)
    return {"seconds": time.perf_counter() - t, "entries": len(names)}


def httprand(host: str, port: int, path: str, size: int, count: int, seed: int) -> dict[str, float | int]:
    """The floor of random reads over HTTP: one keep-alive connection, one 4 KiB range per read."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        offsets = _random_offsets(size, count, seed)
        t = time.perf_counter()
        got = 0
        for off in offsets:
            conn.request("GET", path, headers={"Range": f"bytes={off}-{off + BLOCK_BYTES - 1}"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 206:
                raise SystemExit(f"range GET answered {resp.status}")
            got += len(body)
        elapsed = time.perf_counter() - t
    finally:
        conn.close()
    return {"seconds": elapsed, "bytes": got, "reads": count}


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "ttfb":
        out: dict[str, object] = dict(ttfb(args[0], int(args[1])))
    elif cmd == "randread":
        out = dict(randread(args[0], int(args[1]), int(args[2])))
    elif cmd == "stat":
        out = stat_paths(args[0], args[1])
    elif cmd == "listdir":
        out = dict(listdir(args[0]))
    elif cmd == "httprand":
        out = dict(httprand(args[0], int(args[1]), args[2], int(args[3]), int(args[4]), int(args[5])))
    else:
        raise SystemExit(f"unknown probe {cmd!r}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
