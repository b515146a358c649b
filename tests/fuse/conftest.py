"""Fixtures of the mounted tests; the mount helpers themselves are tests/support/mounts.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mounts import require_fuse

HELPER = Path("/sbin/mount.fuse.blobmount")


@pytest.fixture
def helper_installed() -> Iterator[None]:
    """The helper where mount(8) looks for it: `make install` puts it there; else link it for the test."""
    require_fuse()
    ours = Path(sys.executable).parent / "mount.fuse.blobmount"
    assert ours.exists(), "the mount.fuse.blobmount console script is not installed (pip install -e .)"
    created = False
    if not HELPER.exists():
        HELPER.symlink_to(ours)
        created = True
    try:
        yield
    finally:
        if created:
            HELPER.unlink()
