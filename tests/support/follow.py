"""Archives that change under a --follow mount, and which one it serves."""

from __future__ import annotations

import os
from pathlib import Path

from blobmount.create import CreateOptions, create_archive

SWITCH_WAIT_S = 90.0  # hang guard: a switch takes about one interval (1 s) plus a few round trips


def archive_of(tmp: Path, name: str, files: dict[str, bytes]) -> Path:
    src = tmp / f"{name}-src"
    for rel, data in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))  # same metadata in v1 and v2
    out = tmp / f"{name}-archive"
    create_archive(src, out, CreateOptions(compression="none"))
    return out


def served_digest(mnt: Path) -> str:
    return os.getxattr(mnt, "user.blobmount.digest").decode()
