"""Archive generations of one mount (``--follow``): which archive an inode number belongs to.

A mount that follows a tag serves one archive at a time, the *current* generation, but a file the
kernel still knows (looked up, or open) keeps its archive: generation ``g`` numbers its files
``(g << GEN_SHIFT) + FILE_INO_BASE + entry``, so an inode number says its archive and its entry
without a table, and generation 0 numbers them exactly as a mount that does not follow. Every file
of a new archive gets a new number, unchanged ones too: one number never names two archives'
metadata, the switch needs no per-file table (a million-entry index would need one), and the
price, the kernel's pages of unchanged files, is paid from the local cache, not the network
(:meth:`Generation.source_of`). Directories are not per generation: a path keeps its directory
inode across switches (fs.py), and its listing follows the current archive.

The kernel's lookup counts are tracked per generation (``lookup`` and readdirplus add, ``forget``
subtracts), so an old generation is dropped once the kernel holds none of its inodes and no file
of it is open; at most ``keep`` generations are alive at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3

from blobmount.errors import InvalidArchive
from blobmount.index import Entry, IndexView
from blobmount.reader import Reader
from blobmount.sources.base import Archive

FILE_INO_BASE = pyfuse3.ROOT_INODE + 1
GEN_SHIFT = 40  # files of a generation: up to 2**40 entries (and directory inodes stay below 2**40)
DEFAULT_KEEP = 2  # archives alive at once: the current one and the one before it


@dataclass(eq=False, slots=True)
class Generation:
    """One archive as the mount serves it: its index, its reader, what the kernel holds of it."""

    number: int
    archive: Archive | None  # None: a filesystem built without one (unit tests)
    view: IndexView
    reader: Reader
    dir_time_ns: int
    prev: Generation | None = None  # the generation before (bytes of unchanged files come from it)
    cached_bytes: Callable[[Entry], int] | None = None  # bytes of an entry in the local cache
    lookups: dict[int, int] = field(default_factory=dict)  # file inode -> the kernel's lookup count
    handles: int = 0  # open files reading through this generation's reader, and open directories
    dir_stats: dict[int, tuple[int, int]] = field(default_factory=dict)  # dir inode -> (nlink, time)

    @property
    def base(self) -> int:
        return (self.number << GEN_SHIFT) + FILE_INO_BASE

    def ino(self, number: int) -> int:
        return self.base + number

    def entry_of(self, ino: int) -> Entry | None:
        number = ino - self.base
        if 0 <= number < len(self.view):
            return self.view.entry(number)
        return None

    def in_use(self) -> bool:
        return bool(self.lookups) or self.handles > 0

    @property
    def digest(self) -> str:
        """The manifest digest for a registry archive (its name ends ``@sha256:…``), else the
        index blob's digest (local archives)."""
        if self.archive is None:
            return ""
        _, sep, digest = self.archive.name.rpartition("@")
        return digest if sep and digest.startswith("sha256:") else self.archive.index_digest

    def source_of(self, entry: Entry) -> tuple[Generation, Entry]:
        """Where `entry`'s bytes are read: the oldest kept generation holding the same path with
        the same sha256, size and encoding, so a switch fetches only what changed (its chunks are
        keyed by its data blob, already cached); else this generation."""
        gen, found = self, entry
        older = gen.prev
        while older is not None:
            number = older.view.find(found.path)
            if number is None:
                break
            try:
                candidate = older.view.entry(number)
            except InvalidArchive:
                break
            if (candidate.hash, candidate.original_size, candidate.compression) != (
                found.hash,
                found.original_size,
                found.compression,
            ):
                break
            gen, found, older = older, candidate, older.prev
        return gen, found


@dataclass(slots=True)
class Changes:
    """What a switch changed, by path: the names to invalidate and the directories whose listing
    or time changed."""

    names: set[bytes] = field(default_factory=set)  # added, removed or changed (files and directories)
    dirs: set[bytes] = field(default_factory=set)
    added: int = 0
    removed: int = 0
    changed: int = 0


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def _same(a: Entry, b: Entry) -> bool:
    return (a.hash, a.original_size, a.mode, a.uid, a.gid, a.mtime_ns, a.compression) == (
        b.hash,
        b.original_size,
        b.mode,
        b.uid,
        b.gid,
        b.mtime_ns,
        b.compression,
    )


def changes(old: IndexView, new: IndexView) -> Changes:
    """Compare two indexes by path. Every entry of `new` is validated on the way (an invalid one
    raises InvalidArchive: the new archive is refused before anything switches). Runs on a
    worker thread: both views are immutable."""
    out = Changes()

    def appeared(path: bytes, before: IndexView) -> None:
        """Directories above `path` that `before` did not have are names too."""
        out.dirs.add(_parent(path))
        parent = _parent(path)
        while parent and not before.is_dir(parent):
            out.names.add(parent)
            out.dirs.add(_parent(parent))
            parent = _parent(parent)

    for entry in new.entries():
        number = old.find(entry.path)
        if number is None:
            out.names.add(entry.path)
            out.added += 1
            appeared(entry.path, old)
            continue
        try:
            same = _same(old.entry(number), entry)
        except InvalidArchive:
            same = False
        if not same:
            out.names.add(entry.path)
            out.dirs.add(_parent(entry.path))
            out.changed += 1
    for number in range(len(old)):
        try:
            path = old.path(number)
        except InvalidArchive:  # never served either
            continue
        if new.find(path) is None:
            out.names.add(path)
            out.removed += 1
            appeared(path, new)
    return out
