"""Inode numbers of directories and the attributes of every inode (what stat(2) shows).

Files need no table: a file's inode is its generation's base plus its entry number
(generations.py). Directories are implied by paths (docs/FORMAT.md): a directory gets its inode on
first use, above the last file inode, and keeps it for the life of the mount, across ``--follow``
switches (its listing follows the current archive). Touched only from the trio thread.
"""

from __future__ import annotations

import stat

import pyfuse3

from blobmount.errors import InvalidArchive, NotADirectory, NotFound
from blobmount.generations import FILE_INO_BASE, Changes, Generation
from blobmount.index import Entry
from blobmount.served import ServedArchives

ROOT_INO = pyfuse3.ROOT_INODE
IO_BLOCK_BYTES = 128 << 10  # st_blksize: matches the kernel's FUSE read size, so cp/cat ask for it
DIR_MODE = stat.S_IFDIR | 0o755  # directories are implied by paths (docs/FORMAT.md)


class Inodes:
    """Directory inodes and every inode's attributes (module docstring)."""

    def __init__(self, archives: ServedArchives, *, uid: int | None, gid: int | None, timeout_s: float) -> None:
        """`uid`, `gid`: every inode's owner (None: the archive's); `timeout_s`: how long the
        kernel may keep names and attributes (the content never changes)."""
        self.archives = archives
        self.uid = uid
        self.gid = gid
        self.timeout_s = timeout_s
        self._next_dir_ino = FILE_INO_BASE + len(archives.current.view)
        self._dir_ino: dict[bytes, int] = {b"": ROOT_INO}
        self._dir_path: dict[int, bytes] = {ROOT_INO: b""}

    def dir_inode(self, path: bytes) -> int:
        ino = self._dir_ino.get(path)
        if ino is None:
            ino = self._next_dir_ino
            self._next_dir_ino += 1
            self._dir_ino[path] = ino
            self._dir_path[ino] = path
        return ino

    def inode_for(self, kind: int, path: bytes, gen: Generation | None = None) -> int:
        return (gen or self.archives.current).ino(kind) if kind >= 0 else self.dir_inode(path)

    def entry_of(self, ino: int) -> Entry | None:
        found = self.archives.file_of(ino)
        return None if found is None else found[1]

    def dir_of(self, ino: int) -> bytes:
        path = self._dir_path.get(ino)
        if path is None:
            if self.entry_of(ino) is not None:
                raise NotADirectory(f"inode {ino}: not a directory")
            raise NotFound(f"inode {ino}: unknown")
        return path

    def _dir_stats_of(self, ino: int, path: bytes) -> tuple[int, int]:
        """(st_nlink, time) of a directory, from one pass over its children at its first stat and
        kept for the mount: nlink is 2 + subdirectories (find(1) relies on it); the time is the
        newest mtime of the files directly in it, else :attr:`dir_time_ns`. A directory of 0
        (1970) is refused by zip and copied as such by tar and rsync -t; the newest file is what a
        directory's mtime is after its files were written, and costs nothing beyond the pass nlink
        needed already (a subdirectory's own time would need its subtree: not looked at)."""
        gen = self.archives.current
        known = gen.dir_stats.get(ino)
        if known is None:
            subdirs, newest = 0, None
            # with every file's validated entry: the pass runs when the parent is listed (its
            # readdirplus needs this directory's nlink), and this directory's own listing comes
            # next in a walk: its entries are then in the view's cache, read once for both
            for child, found in gen.view.child_entries(path):
                if found is None:
                    subdirs += 1
                    continue
                if isinstance(found, Entry):
                    t = found.mtime_ns
                else:  # refused for a field other than its path: still lends its time, as before
                    try:
                        t = gen.view.mtime_ns(child.entry)
                    except InvalidArchive:  # unreadable: lends no time
                        continue
                if newest is None or t > newest:
                    newest = t
            known = (2 + subdirs, gen.dir_time_ns if newest is None else newest)
            gen.dir_stats[ino] = known
        return known

    def attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        entry = self.entry_of(ino)
        if entry is not None:
            return self.file_attrs(ino, entry)
        return self.dir_attrs(ino, self.dir_of(ino))

    def _base_attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.generation = 0
        attr.entry_timeout = self.timeout_s
        attr.attr_timeout = self.timeout_s
        attr.st_rdev = 0
        attr.st_blksize = IO_BLOCK_BYTES
        return attr

    def file_attrs(self, ino: int, entry: Entry) -> pyfuse3.EntryAttributes:
        """The attributes of file inode `ino`, whose entry the caller has (a listing)."""
        attr = self._base_attrs(ino)
        attr.st_mode = stat.S_IFREG | (entry.mode & 0o777)
        attr.st_nlink = 1
        attr.st_uid = entry.uid if self.uid is None else self.uid
        attr.st_gid = entry.gid if self.gid is None else self.gid
        attr.st_size = entry.original_size
        attr.st_blocks = (entry.original_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = entry.mtime_ns
        return attr

    def dir_attrs(self, ino: int, path: bytes) -> pyfuse3.EntryAttributes:
        """The attributes of directory inode `ino` at `path`."""
        attr = self._base_attrs(ino)
        attr.st_mode = DIR_MODE
        attr.st_nlink, when = self._dir_stats_of(ino, path)
        attr.st_uid = 0 if self.uid is None else self.uid
        attr.st_gid = 0 if self.gid is None else self.gid
        attr.st_size = 0
        attr.st_blocks = 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = when
        return attr

    @staticmethod
    def child_path(parent: bytes, name: bytes) -> bytes:
        return parent + b"/" + name if parent else name

    def names_after_switch(self, old: Generation, changed: Changes) -> tuple[list[tuple[int, bytes]], list[int]]:
        """After a ``--follow`` switch: the (parent inode, name) pairs the kernel may hold of `old`
        (every name whose inode it holds: all files got new numbers; every added, removed or
        changed name) and the directories whose listing or time changed."""
        names: set[tuple[int, bytes]] = set()
        for ino in list(old.lookups):
            entry = old.entry_of(ino)
            parent = None if entry is None else self._dir_ino.get(entry.path.rpartition(b"/")[0])
            if entry is not None and parent is not None:
                names.add((parent, entry.name))
        for path in changed.names:
            parent_path, _, name = path.rpartition(b"/")
            parent = self._dir_ino.get(parent_path)
            if parent is not None:
                names.add((parent, name))
        dirs = [ino for ino in (self._dir_ino.get(path) for path in changed.dirs) if ino is not None]
        return sorted(names), dirs
