"""Phase 2 of a copy: DEST and the directories below it, each opened one component at a time from
DEST's descriptor with ``O_NOFOLLOW``, so a symbolic link (or a file) in the way is an error, never
followed, and nothing is written outside DEST whatever the archive's paths or DEST's contents.
Also the ``--clean-dest`` guard (never ``/``, the working directory's ancestors or the cache)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
from collections import OrderedDict

from blobmount.errors import DestinationError, UsageError
from blobmount.index.paths import show

DIR_FDS = 128  # directory descriptors kept open (LRU); more are reopened from DEST
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_clean_dest(dest: bytes, cache_dir: bytes | None) -> None:
    """Refuse to empty `/`, the working directory or any of its ancestors, and any directory
    overlapping the cache directory (it, inside it, or holding it)."""
    real = os.path.realpath(dest)
    here = os.path.realpath(os.getcwd().encode())
    if real == b"/":
        raise UsageError("--clean-dest: refusing to empty /")
    if _within(here, real):
        raise UsageError(f"--clean-dest: refusing to empty {os.fsdecode(dest)!r}: it holds the current directory")
    if cache_dir is not None:
        cache = os.path.realpath(cache_dir)
        if _within(cache, real) or _within(real, cache):
            raise UsageError(f"--clean-dest: refusing to empty {os.fsdecode(dest)!r}: it overlaps the cache directory")


def _within(path: bytes, directory: bytes) -> bool:
    return path == directory or path.startswith(directory.rstrip(b"/") + b"/")


class Dest:
    """DEST and the directories below it, opened component by component with O_NOFOLLOW."""

    def __init__(self, dest: bytes) -> None:
        self.dest = dest
        try:
            os.makedirs(dest, exist_ok=True)
            self.root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise DestinationError(f"{os.fsdecode(dest)}: {exc.strerror}") from exc
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self._pins: dict[bytes, int] = {}
        self._fresh: set[bytes] = set()  # directories this copy created: nothing was in them
        self._names: dict[bytes, frozenset[bytes]] = {}  # what the others held when first looked at
        self._lock = threading.RLock()  # worker threads open and rename files too

    def show(self, rel: bytes) -> str:
        return show(os.path.join(self.dest, rel) if rel else self.dest, limit=240)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.root)

    def empty(self) -> None:
        """Remove everything in DEST (symbolic links are removed, never followed)."""
        for name in map(os.fsencode, os.listdir(self.root)):  # str names (surrogateescape) from an fd
            try:
                st = os.stat(name, dir_fd=self.root, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=self.root)
                else:
                    os.unlink(name, dir_fd=self.root)
            except OSError as exc:
                raise DestinationError(f"--clean-dest: {self.show(name)}: {exc.strerror}") from exc

    def dir_fd(self, rel: bytes, create: bool = False) -> int:
        """The descriptor of directory DEST/`rel`, creating it (and its parents) when asked. Only
        for the single-threaded set-up; the copy itself holds descriptors through :meth:`pin`."""
        with self._lock:
            return self._open(rel, create)

    def pin(self, rel: bytes) -> int:
        """DEST/`rel`'s descriptor, never closed by the LRU until as many :meth:`unpin` calls (on
        whichever thread: a file's directory from its temporary's creation to its rename)."""
        with self._lock:
            fd = self._open(rel, False)
            self._pins[rel] = self._pins.get(rel, 0) + 1
            return fd

    def unpin(self, rel: bytes) -> None:
        with self._lock:
            left = self._pins.pop(rel) - 1
            if left:
                self._pins[rel] = left
            self._evict()

    def _open(self, rel: bytes, create: bool) -> int:
        if not rel:
            return self.root
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        parent_rel, _, name = rel.rpartition(b"/")
        parent = self._open(parent_rel, create)
        if create:
            try:
                os.mkdir(name, 0o777, dir_fd=parent)
                self._fresh.add(rel)
            except FileExistsError:
                pass
            except OSError as exc:
                raise DestinationError(f"{self.show(rel)}: cannot create the directory: {exc.strerror}") from exc
        try:
            fd = os.open(name, _O_DIR, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                what = "a symbolic link" if _is_link(name, parent) else "not a directory"
                raise DestinationError(f"{self.show(rel)}: {what} in the way; cp never follows or replaces it") from exc
            raise DestinationError(f"{self.show(rel)}: {exc.strerror}") from exc
        self._fds[rel] = fd
        self._evict()
        return fd

    def _evict(self) -> None:
        """Close the least recently used descriptors over DIR_FDS that nobody holds."""
        if len(self._fds) <= DIR_FDS:
            return
        for old in list(self._fds):
            if len(self._fds) <= DIR_FDS:
                return
            if old not in self._pins:
                os.close(self._fds.pop(old))

    def exists(self, rel: bytes) -> bool:
        """Whether DEST/`rel` is there (a directory in the way is an error). A directory this copy
        created holds nothing of before; any other is listed once, so only the names it holds cost
        a stat (not one stat per file of the archive)."""
        parent_rel, _, name = rel.rpartition(b"/")
        if parent_rel in self._fresh:
            return False
        names = self._names.get(parent_rel)
        if names is None:
            try:
                names = frozenset(map(os.fsencode, os.listdir(self.dir_fd(parent_rel))))
            except OSError as exc:
                raise DestinationError(f"{self.show(parent_rel)}: {exc.strerror}") from exc
            self._names[parent_rel] = names
        if name not in names:
            return False
        try:
            st = os.stat(name, dir_fd=self.dir_fd(parent_rel), follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise DestinationError(f"{self.show(rel)}: {exc.strerror}") from exc
        if stat.S_ISDIR(st.st_mode):
            raise DestinationError(f"{self.show(rel)}: a directory is in the way of this file")
        return True


def _is_link(name: bytes, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
