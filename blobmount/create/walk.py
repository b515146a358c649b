"""The source tree: its regular files in path-byte order, never following a symbolic link."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

from blobmount.errors import SourceError
from blobmount.index.paths import path_problem, show

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Source:
    rel: bytes
    st: os.stat_result


def walk_tree(root: bytes) -> tuple[list[Source], int]:
    """Regular files under `root` as (relative byte path, lstat), sorted by path bytes.

    Symlinks and special files are skipped with a warning and never followed. Returns the files and
    the number skipped."""
    found: list[Source] = []
    skipped = 0
    stack: list[bytes] = [b""]
    while stack:
        rel_dir = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel_dir) if rel_dir else root)
        except OSError as exc:
            raise SourceError(f"{show(rel_dir or b'.')}: cannot list: {exc.strerror}") from exc
        with it:
            for de in it:
                rel = rel_dir + b"/" + de.name if rel_dir else de.name
                st = de.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    problem = path_problem(rel)
                    if problem is not None:
                        log.warning("%s: %s; skipped", show(rel), problem)
                        skipped += 1
                        continue
                    found.append(Source(rel, st))
                else:
                    kind = "symlink" if stat.S_ISLNK(st.st_mode) else "special file"
                    log.warning("%s: %s skipped (only regular files are archived)", show(rel), kind)
                    skipped += 1
    found.sort(key=lambda s: s.rel)
    return found, skipped
