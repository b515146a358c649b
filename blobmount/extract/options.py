"""What a copy is asked for (CopyOptions) and what it reports (CopyResult): the one record the
command line fills and the library returns, apart from how the copy is carried out."""

from __future__ import annotations

from dataclasses import dataclass

from blobmount import defaults

DEFAULT_CONCURRENCY = defaults.CP_CONCURRENCY
DEFAULT_BUFFER_BYTES = defaults.CP_BUFFER_BYTES  # fetched bytes held in memory before they are written


@dataclass(frozen=True, slots=True)
class CopyOptions:
    concurrency: int = DEFAULT_CONCURRENCY
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    overwrite: bool = False
    preserve_mode: bool = False
    preserve_times: bool = False
    fsync: bool = False
    clean_dest: bool = False
    progress: bool | None = None  # None: on a terminal


@dataclass(slots=True)
class CopyResult:
    files: int = 0  # written
    skipped: int = 0  # already present (no --overwrite)
    bytes: int = 0  # content bytes written
    retried: int = 0  # files read a second time after a mismatch
