"""Every default a user can read about (``--help``, the README's Configuration table), written once.

A leaf: it imports nothing, so the cache, the registry client, the reader and the CLI can all take
their defaults from here without importing each other, and the mount path pays nothing for it.
The CLI's help texts are built from these values (:func:`size_text`), so a change here changes
what a user reads too.
"""

from __future__ import annotations

from typing import Final

CACHE_SIZE_BYTES = 10 << 30  # --cache-size: room for the working set of large archives
CHUNK_SIZE_BYTES = 1 << 20  # --chunk-size: measured best of 256K/1M/4M through a 10 ms link (README)
VERIFY_THRESHOLD_BYTES = 4 << 20  # --verify-threshold: raw files this small are verified before a byte
VERIFY_POLICY: Final = "lazy"  # --verify
TIMEOUT_S = 30.0  # --timeout: one operation across retries (DESIGN §8)
MAX_CONNECTIONS = 8  # --max-connections: concurrent connections (and range requests) to a registry
READ_AHEAD_KB = 1024  # --read-ahead-kb: the kernel reads ahead 1 MiB per FUSE request (README)
FOLLOW_INTERVAL_S = 60.0  # --follow-interval
FOLLOW_KEEP = 2  # --follow-keep: the archive served and the one before it
CP_CONCURRENCY = 4  # cp --concurrency: range reads in flight
CP_BUFFER_BYTES = 64 << 20  # cp --buffer: fetched bytes held in memory before they are written

_UNITS = ((1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K"))


def size_text(n: int) -> str:
    """The shortest exact form config.parse_size reads back: 10G, 4M, 64M, 1536K, 4096."""
    for factor, unit in _UNITS:
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)
