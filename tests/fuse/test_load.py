"""Load with random faults (tests/support/load.py): 64 readers, half threads and half processes, mixed
sequential and random reads over a 20,000-file archive mounted from the real registry through the
fault proxy, for a bounded time. Zero wrong bytes, zero hung reads, only EIO as an error, nothing
poisoned once the faults stop, the daemon's RSS and fds bounded. The soak is
``python -m tests.support.load --soak``; ``BLOBMOUNT_LOAD_SECONDS`` lengthens this run and
``BLOBMOUNT_LOAD_REPORT=FILE`` keeps its JSON report."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.support import load
from tests.support.servers import Registry

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

FILES = 20_000
READERS = 64
SECONDS = float(os.environ.get("BLOBMOUNT_LOAD_SECONDS", "30"))
FAULT_RATE = 0.02  # share of data-blob requests that meet a fault
FD_LIMIT = 2 * READERS + 64  # each reader holds at most one open file; plus sockets and the store


def test_load_with_random_faults(registry: Registry, tmp_path: Path) -> None:
    with load.mounted_archive(tmp_path, registry, FILES, seed=1) as setup:
        report = load.run(
            setup.mnt,
            setup.pid,
            setup.proxy,
            setup.digest,
            files=FILES,
            seed=1,
            threads=READERS // 2,
            processes=READERS - READERS // 2,
            seconds=SECONDS,
            fault_rate=FAULT_RATE,
        )
    summary = json.dumps(asdict(report))
    print(summary)
    if os.environ.get("BLOBMOUNT_LOAD_REPORT"):
        Path(os.environ["BLOBMOUNT_LOAD_REPORT"]).write_text(summary + "\n")
    assert report.wrong == 0, report.wrong_examples
    assert report.hung == 0
    assert set(report.errors) <= {"EIO"}, report.errors
    assert report.files_failed_after_faults_cleared == 0
    assert report.reads >= READERS  # every reader got through at least one read
    assert sum(report.faults_injected.values()) > 0  # the faults really happened
    assert report.daemon_peak_rss_mib * (1 << 20) < load.RSS_LIMIT_BYTES
    assert report.daemon_peak_fds < FD_LIMIT
