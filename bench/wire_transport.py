"""``python -m bench.wire_transport``: CPU-s/GiB (this process: the client) of streaming 256 MiB of
range bodies (8 MiB ranges) from docker-registry on 127.0.0.1 through RegistryClient.iter_range,
over registry/wire.py's transport, httpx's own (64 KiB reads), and httpx's with httpcore's read
size raised to 1 MiB (an experiment only: that attribute is private). Three interleaved runs."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpcore._async.http11 as h11mod
import trio

from blobmount.reference import Digest, Reference
from blobmount.registry import transport as tmod
from blobmount.registry.client import RegistryClient, RegistryOptions
from blobmount.registry.upload import bytes_reader

SIZE = 256 << 20
RANGE = 8 << 20
MODES = ("wire", "httpx64k", "httpx1m")


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def upload(ref: Reference, blob: bytes) -> Digest:
    c = RegistryClient(ref, RegistryOptions(), push=True)
    d = Digest.of(blob)
    if not await c.blob_exists(d):
        await c.upload_blob(d, len(blob), bytes_reader(blob), chunk_bytes=16 << 20)
    await c.aclose()
    return d


async def read_all(ref: Reference, d: Digest) -> None:
    c = RegistryClient(ref, RegistryOptions())
    got = 0
    for start in range(0, SIZE, RANGE):
        async for b in c.iter_range(d, start, start + RANGE, SIZE):
            got += len(b)
    await c.aclose()
    assert got == SIZE


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.servers import start_registry

    real_proxied = tmod._proxied
    res: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        reg = start_registry(Path(tmp) / "r")
        try:
            ref = Reference.parse(f"{reg.host}/micro/blob:v1")
            d = trio.run(upload, ref, os.urandom(SIZE))
            for i in range(3):
                for m in MODES if i % 2 == 0 else tuple(reversed(MODES)):
                    tmod._proxied = real_proxied if m == "wire" else (lambda host: True)  # type: ignore[assignment,unused-ignore]
                    h11mod.AsyncHTTP11Connection.READ_NUM_BYTES = (1 << 20) if m == "httpx1m" else 64 * 1024
                    c0, t0 = cpu(), time.perf_counter()
                    trio.run(read_all, ref, d)
                    c1, t1 = cpu(), time.perf_counter()
                    res[m].append((c1 - c0) / (SIZE / (1 << 30)))
                    print(i, m, f"{res[m][-1]:.3f} CPU-s/GiB wall {t1 - t0:.2f}s", flush=True)
        finally:
            reg.stop()
    for m, v in res.items():
        print(m, "median", f"{statistics.median(v):.3f}", "spread", f"{min(v):.3f}-{max(v):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
