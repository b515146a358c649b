"""What `blobmount create` is asked for (CreateOptions: compression, the reference's skip rule,
file limit, change detection, threads) and what it reports (CreateResult)."""

from __future__ import annotations

import os
from dataclasses import dataclass

SKIP_BELOW_BYTES = 1024  # the reference CLI's DefaultSkipCompression(1024): tiny files stay raw
DEFAULT_LEVEL = 3  # zstd's own default: the reference's speed/ratio trade-off is close to it
# The reference CLI's default list: formats that are already compressed (name only, never content).
SKIP_EXTENSIONS = frozenset(
    b".7z .aac .avif .br .bz2 .flac .gif .gz .heic .ico .jpeg .jpg .m4v .mkv .mov .mp3 .mp4 .ogg"
    b" .opus .pdf .png .rar .tgz .wav .webm .webp .woff .woff2 .xz .zip .zst".split()
)
REFERENCE_MAX_FILES = 200_000  # the reference writer's DefaultMaxFiles (its MaxFiles 0 means this)
CHANGE_DETECTION = ("none", "strict")


@dataclass(frozen=True, slots=True)
class CreateOptions:
    compression: str = "zstd"  # "zstd" or "none"
    level: int = DEFAULT_LEVEL
    progress: bool | None = None  # None: only when stderr is a terminal and the tree is large
    max_files: int | None = None  # None or negative: no limit; 0: the reference's 200,000; N: N
    change_detection: str = "none"  # "strict": a file whose size or mtime changes while read fails
    skip_compression: bool = True  # False: every file is compressed (with zstd), whatever its size or name
    skip_below: int = SKIP_BELOW_BYTES  # files smaller than this stay raw
    skip_extensions: frozenset[bytes] = SKIP_EXTENSIONS  # lower-case, with the dot
    threads: int = 0  # zstd compression threads; 0: one per core this process may use

    def compresses(self, path: bytes, size: int) -> bool:
        """Whether a file of this name and size is compressed (the reference's skip rule: small
        files and known compressed extensions stay raw, by name only, never by content)."""
        if self.compression != "zstd":
            return False
        if not self.skip_compression:
            return True
        if size < self.skip_below:
            return False
        name = path.rpartition(b"/")[2]
        dot = name.rfind(b".")
        return dot < 0 or name[dot:].lower() not in self.skip_extensions

    def file_limit(self) -> int | None:
        """The reference's MaxFiles meanings: 0 is its default, a negative number no limit."""
        if self.max_files is None or self.max_files < 0:
            return None
        return self.max_files or REFERENCE_MAX_FILES

    def worker_threads(self) -> int:
        if self.threads > 0:
            return self.threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return os.cpu_count() or 1


def extension_list(text: str) -> frozenset[bytes]:
    """`png,.JPG gz` -> {b".png", b".jpg", b".gz"}: the form --skip-compression-ext takes."""
    words = text.replace(",", " ").split()
    return frozenset(b"." + os.fsencode(w.lower().lstrip(".")) for w in words if w.strip("."))


@dataclass(frozen=True, slots=True)
class CreateResult:
    entries: int
    data_size: int
    data_sha256: str
    index_size: int
    index_sha256: str
    skipped: int
