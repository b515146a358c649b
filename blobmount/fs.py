"""The pyfuse3 Operations class: thin handlers over the index view and the reader.

Inodes (no per-entry objects): the root is 1; file inodes are ``FILE_INO_BASE + entry number``, so
they need no table; directory inodes are allocated on first use above the last file inode and kept
for the life of the mount (st_ino is stable and unique). Under ``--follow`` each archive the mount
switches to is a generation whose files are numbered in a space of their own (generations.py);
``forget`` counts down the kernel's lookups so an old generation can be dropped.

Opens (the kernel's no-open / no-opendir mode): ``opendir`` answers ENOSYS (not under --follow:
a listing begun continues in its archive), so the kernel opens directories without a request,
caches their listings (FOPEN_CACHE_DIR) and sends no releasedir; ``readdir`` then gets fh 0 and
the inode (the patched pyfuse3, ``pass_inode``). ``open`` answers ENOSYS too once
:meth:`BlobFS.decide_opens` found that the archive holds no file verified lazily (every byte of
every file is verified before it is served): the kernel then opens files without a request, keeps
their pages across opens and sends no flush or release, and a read of fh 0 is served through a
per-inode handle set up by the file's first read (handles.py). An archive with a lazily verified
file keeps real opens: a handle opened before a mismatch must fail ("Trust first"), which needs
per-open state. Without the patched pyfuse3 every open and opendir reaches the daemon, as before.

Every handler runs inside :func:`_fuse_errors`: a :class:`BlobmountError` becomes its errno from the
one table in errors.py; anything else is logged with its traceback and becomes EIO. Only FUSEError
leaves a handler, so one bad request never takes the mount down. trio.Cancelled is never caught.
Under a kernel FUSE request timeout the wrapper also answers EIO once a handler has had its share
of it (``deadline_s``), so no request outlives the timeout and the kernel never aborts the mount.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from blobmount.daemon import metrics
from blobmount.errors import (
    BlobmountError,
    IntegrityError,
    InvalidArchive,
    IsADirectory,
    NoAttribute,
    NotADirectory,
    NotFound,
    NotSupported,
    ReadOnly,
    RequestNotNeeded,
    TransientError,
    Unservable,
    errno_for,
)
from blobmount.generations import DEFAULT_KEEP, GEN_SHIFT, Changes, Generation
from blobmount.generations import FILE_INO_BASE as FILE_INO_BASE
from blobmount.handles import InodeHandles
from blobmount.index import COMPRESSION_ZSTD, Entry, IndexView
from blobmount.index.paths import show
from blobmount.kernel import PageDrops, invalidate_names
from blobmount.reader import Handle, Reader
from blobmount.source import Archive

log = logging.getLogger(__name__)

ROOT_INO = pyfuse3.ROOT_INODE
BLOCK_SIZE_BYTES = 4096  # statfs unit
IO_BLOCK_BYTES = 128 << 10  # st_blksize: matches the kernel's FUSE read size, so cp/cat ask for it
DIR_MODE = stat.S_IFDIR | 0o755  # directories are implied by paths (docs/FORMAT.md)
XATTR_PREFIX = b"user.blobmount."
XATTRS = (b"sha256", b"compression", b"stored_size", b"verified")  # and cached_bytes: by name only
ROOT_XATTR_DIGEST = XATTR_PREFIX + b"digest"  # on the root: the archive being served (--follow moves it)
# xattr namespaces no file here has (no labels, no ACLs in the format): EOPNOTSUPP (errors.NotSupported)
UNSUPPORTED_XATTRS = (b"security.", b"trusted.", b"system.posix_acl_")
# pyfuse3 built with patches/pyfuse3-3.5.0-pass-inode.patch (make venv): read/readdir/release get the
# inode, which the kernel's no-open mode needs (its requests carry fh 0)
PYFUSE3_PASSES_INODE = "pass_inode" in vars(pyfuse3.Operations)
DECIDE_SLICE_ENTRIES = 4096  # entries read between checkpoints of decide_opens (~10 ms of the trio thread)

P = ParamSpec("P")
R = TypeVar("R")


# The handlers that wait (for the network, for disk threads); the others answer from memory without
# a checkpoint, so a deadline could never fire in them, and its cancel scope (18-29 us measured with
# trio 0.35, as much as a getattr itself) is spent only where it can.
_WAITING_OPS = frozenset({"open", "read"})


async def _within(seconds: float, op: str, handler: Coroutine[Any, Any, R]) -> R:
    with trio.move_on_after(seconds):
        return await handler
    raise TransientError(
        f"{op}: not served within {seconds:g} s, the bound under the kernel's FUSE request timeout;"
        " answered EIO (the next request tries afresh)"
    )


def _fuse_errors(
    func: Callable[Concatenate[BlobFS, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[BlobFS, P], Coroutine[Any, Any, R]]:
    """Translate every exception of a handler at the FUSE boundary (the only place that does), and
    answer a waiting one (_WAITING_OPS) within the filesystem's ``deadline_s`` of taking the
    request: past it the handler is cancelled and the reader gets EIO. What it waited for (a fetch)
    goes on in the mount's nursery or is dropped cleanly, so the next request tries afresh."""

    op = func.__name__
    requests, latency = metrics.FUSE_REQUESTS.labels(op=op), metrics.FUSE_LATENCY.labels(op=op)

    waits = op in _WAITING_OPS

    @functools.wraps(func)
    async def wrapper(fs: BlobFS, /, *args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        code = 0
        try:
            if waits and fs.deadline_s < math.inf:
                result = await _within(fs.deadline_s, op, func(fs, *args, **kwargs))
            else:
                result = await func(fs, *args, **kwargs)
            if op == "read":
                metrics.FUSE_READ_BYTES.inc(len(result))  # type: ignore[arg-type]
            return result
        except pyfuse3.FUSEError as exc:
            code = exc.errno
            raise
        except (IntegrityError, Unservable) as exc:  # the reader logged it once, when it found it
            code = errno_for(exc)
            log.debug("%s: %s", func.__name__, exc)
            raise pyfuse3.FUSEError(code) from None
        except BlobmountError as exc:
            code = errno_for(exc)
            if code == errno.EIO:
                log.error("%s", exc)
            else:
                log.debug("%s: %s", func.__name__, exc)
            raise pyfuse3.FUSEError(code) from None
        except Exception as exc:
            code = errno_for(exc)  # EIO: not one of ours
            log.exception("unexpected error in %s; answered EIO", func.__name__)
            raise pyfuse3.FUSEError(code) from None
        finally:  # metrics: counted here, in the one wrapper every handler goes through
            requests.inc()
            latency.observe(time.perf_counter() - started)
            if code:
                metrics.FUSE_ERRORS.labels(op=op, errno=errno.errorcode.get(code, str(code))).inc()

    return wrapper


class BlobFS(pyfuse3.Operations):
    """A read-only filesystem over one archive."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    # No FUSE_POSIX_ACL. Measured (kernel 6.18, coreutils 9.1 ls -l of 3,000 files): with it the
    # kernel keeps an inode's ENODATA for system.posix_acl_* (warm: 1 getxattr request), but asks
    # once per inode cold, and again in every permission check of a non-owner; without it, and
    # EOPNOTSUPP for those names (UNSUPPORTED_XATTRS), ls remembers the answer per filesystem:
    # 2 requests per ls -l, cold or warm.
    enable_acl = False
    pass_inode = True  # the patched pyfuse3 (module docstring); ignored by an unpatched one

    def __init__(
        self,
        view: IndexView,
        reader: Reader,
        *,
        uid: int | None = None,
        gid: int | None = None,
        timeout_s: float = 86400.0,
        dir_time_ns: int | None = None,
        deadline_s: float = math.inf,
        archive: Archive | None = None,
        pages: PageDrops | None = None,
        cached_bytes: Callable[[Entry], int] | None = None,
        keep: int = DEFAULT_KEEP,
        follows: bool = False,
    ) -> None:
        """`dir_time_ns`: the time of a directory with no file directly in it (the archive's
        creation time; None: now). `deadline_s`: every handler answers within this many seconds
        of taking its request (settings.request_bound: under the kernel's FUSE request timeout);
        inf: no bound. `archive`: where `view` came from (names the digest served). `pages`: the
        page drops `reader` was built with (``pages.for_archive(0)``). `cached_bytes`: bytes of a
        file's data in the local cache (the xattr user.blobmount.cached_bytes; None: absent).
        `keep`: archives alive at most (--follow-keep); `follows`: --follow (the kernel's lookups
        are counted: an old archive is dropped once it holds none)."""
        super().__init__()
        self.uid = uid
        self.gid = gid
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self._next_dir_ino = FILE_INO_BASE + len(view)
        self._dir_ino: dict[bytes, int] = {b"": ROOT_INO}
        self._dir_path: dict[int, bytes] = {ROOT_INO: b""}
        when = time.time_ns() if dir_time_ns is None else dir_time_ns
        # the archive served (generation 0 until --follow switches; generations.py)
        self.current = Generation(0, archive, view, reader, when, cached_bytes=cached_bytes)
        self.generations: dict[int, Generation] = {0: self.current}
        self.keep = keep  # generations alive at most
        self.follows = follows  # the kernel's lookups are counted (nothing to free otherwise)
        self._retired: list[Generation] = []  # dropped, their data sources still to close
        self._handles: dict[int, tuple[Generation, Handle]] = {}
        self._dir_handles: dict[int, tuple[int, Generation]] = {}
        self._next_fh = 1
        self.pages = pages or PageDrops()
        # the kernel's no-open mode (module docstring): opens answered ENOSYS once decide_opens says so
        self.skip_open = False
        self._inode_handles = InodeHandles()

    # -- the archive served ----------------------------------------------------------------------

    @property
    def view(self) -> IndexView:
        return self.current.view

    @view.setter
    def view(self, view: IndexView) -> None:
        self.current.view = view

    @property
    def reader(self) -> Reader:
        return self.current.reader

    @property
    def dir_time_ns(self) -> int:
        return self.current.dir_time_ns

    @property
    def skip_opendir(self) -> bool:
        """Whether opendir answers ENOSYS (no-opendir mode). Not under --follow: there a listing
        already begun continues in the archive it began in (README, Following a tag), which
        needs its opendir; the kernel's cached listing could not say which archive it is from."""
        return PYFUSE3_PASSES_INODE and not self.follows

    def room_for_switch(self) -> bool:
        """Whether a switch keeps at most :attr:`keep` generations: the current one stays (the
        kernel holds its inodes until the invalidations after the switch), and so does every
        older one that the kernel or an open file still uses."""
        busy = sum(1 for g in self.generations.values() if g is not self.current and g.in_use())
        return busy + 2 <= self.keep

    def pages_of_next(self) -> Callable[[Entry], None]:
        """The `drop_pages` of the reader of the next archive :meth:`switch` serves (build that
        reader, then switch, with no await between: the number is the next generation's)."""
        return self.pages.for_archive(self.current.number + 1)

    def switch(
        self, archive: Archive, view: IndexView, reader: Reader, cached_bytes: Callable[[Entry], int] | None
    ) -> Generation:
        """Serve `archive` from now on, in one step (nothing here awaits): new lookups, opens and
        listings see it; inodes of older generations keep resolving to theirs. `reader` was built
        with :meth:`pages_of_next`. The caller checked :meth:`room_for_switch` and then invalidates
        the kernel's caches (:meth:`invalidate_switch`)."""
        old = self.current
        when = archive.created_ns or old.dir_time_ns
        gen = Generation(old.number + 1, archive, view, reader, when, prev=old, cached_bytes=cached_bytes)
        self.generations[gen.number] = gen
        self.current = gen
        self._retire_unused()
        return gen

    def _retire_unused(self) -> None:
        """Drop old generations nobody uses beyond the newest :attr:`keep` (their bytes served
        unchanged files of newer ones: those then read from their own archive)."""
        for number in sorted(self.generations):  # oldest first
            gen = self.generations[number]
            if len(self.generations) <= self.keep:
                break
            if gen is self.current or gen.in_use():
                continue
            del self.generations[number]
            self._inode_handles.drop_generation(gen)
            for other in self.generations.values():
                if other.prev is gen:
                    other.prev = None
            self._retired.append(gen)
            metrics.FOLLOW_ARCHIVES.set(len(self.generations))

    async def decide_opens(self) -> None:
        """Started by mount.py: answer opens with ENOSYS from now on (the kernel's no-open mode) if
        the archive holds no file verified lazily. The pass over the index runs on the trio thread
        in slices (the view's entry cache is not for threads); until it ends opens are real.
        Decided for the first archive only: once a ``--follow`` switch happened, opens stay real
        (the follower verifies later archives before serving when the mode is on, follow.py), and
        the kernel's mode is for the life of the mount."""
        if not PYFUSE3_PASSES_INODE:
            log.info("pyfuse3 is not the patched build (make venv): every open reaches the daemon")
            return
        gen = self.current
        if await _holds_lazy(gen.view, gen.reader.lazy_above()):
            log.info(
                "the archive holds files verified as they are read (larger than --verify-threshold):"
                " every open reaches the daemon (an open before a mismatch must fail)"
            )
        elif self.current is gen and gen.number == 0:
            self.skip_open = True
            log.debug("every file is verified before it is served: opens answered ENOSYS (no-open mode)")

    def take_retired(self) -> list[Generation]:
        """Generations dropped since the last call, for the caller to close their data sources."""
        retired, self._retired = self._retired, []
        return retired

    def _file_of(self, ino: int) -> tuple[Generation, Entry] | None:
        """The generation and entry of a file inode (None: not a file of a kept generation)."""
        gen = self.generations.get(ino >> GEN_SHIFT)
        if gen is None:
            return None
        entry = gen.entry_of(ino)
        return None if entry is None else (gen, entry)

    def _looked_up(self, ino: int) -> None:
        """The kernel now holds one more reference to `ino` (a lookup, or a readdirplus entry)."""
        if not self.follows:
            return
        gen = self.generations.get(ino >> GEN_SHIFT)
        if gen is not None and ino >= gen.base and ino - gen.base < len(gen.view):
            gen.lookups[ino] = gen.lookups.get(ino, 0) + 1

    # -- inode model ---------------------------------------------------------------------------

    def _dir_inode(self, path: bytes) -> int:
        ino = self._dir_ino.get(path)
        if ino is None:
            ino = self._next_dir_ino
            self._next_dir_ino += 1
            self._dir_ino[path] = ino
            self._dir_path[ino] = path
        return ino

    def _inode_for(self, kind: int, path: bytes, gen: Generation | None = None) -> int:
        return (gen or self.current).ino(kind) if kind >= 0 else self._dir_inode(path)

    def _entry_of(self, ino: int) -> Entry | None:
        found = self._file_of(ino)
        return None if found is None else found[1]

    def _dir_of(self, ino: int) -> bytes:
        path = self._dir_path.get(ino)
        if path is None:
            if self._entry_of(ino) is not None:
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
        gen = self.current
        known = gen.dir_stats.get(ino)
        if known is None:
            subdirs, newest = 0, None
            mtime_ns = gen.view.mtime_ns
            for child in gen.view.children(path):
                if child.is_dir:
                    subdirs += 1
                    continue
                try:
                    t = mtime_ns(child.entry)
                except InvalidArchive:  # unusable entry: lookups refuse it; it lends no time
                    continue
                if newest is None or t > newest:
                    newest = t
            known = (2 + subdirs, gen.dir_time_ns if newest is None else newest)
            gen.dir_stats[ino] = known
        return known

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.generation = 0
        attr.entry_timeout = self.timeout_s
        attr.attr_timeout = self.timeout_s
        attr.st_rdev = 0
        attr.st_blksize = IO_BLOCK_BYTES
        entry = self._entry_of(ino)
        if entry is not None:
            attr.st_mode = stat.S_IFREG | (entry.mode & 0o777)
            attr.st_nlink = 1
            attr.st_uid = entry.uid if self.uid is None else self.uid
            attr.st_gid = entry.gid if self.gid is None else self.gid
            attr.st_size = entry.original_size
            attr.st_blocks = (entry.original_size + 511) // 512
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = entry.mtime_ns
            return attr
        path = self._dir_of(ino)
        attr.st_mode = DIR_MODE
        attr.st_nlink, when = self._dir_stats_of(ino, path)
        attr.st_uid = 0 if self.uid is None else self.uid
        attr.st_gid = 0 if self.gid is None else self.gid
        attr.st_size = 0
        attr.st_blocks = 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = when
        return attr

    def _child_path(self, parent: bytes, name: bytes) -> bytes:
        return parent + b"/" + name if parent else name

    # -- lookups -------------------------------------------------------------------------------

    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir_of(parent_inode)
        if name == b".":
            return self._attrs(parent_inode)
        if name == b"..":
            return self._attrs(self._dir_inode(parent.rpartition(b"/")[0]))
        if b"/" in name or not name:
            raise NotFound(f"{show(name)}: no such name")
        path = self._child_path(parent, name)
        kind = self.view.kind(path)
        if kind is None:
            raise NotFound(f"{show(path)}: no such file or directory")
        ino = self._inode_for(kind, path)
        attr = self._attrs(ino)
        if kind >= 0:
            self._looked_up(ino)
        return attr

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Count down the kernel's lookups of file inodes (directory inodes live for the mount);
        an old generation the kernel no longer holds and nobody reads may go."""
        if not self.follows:
            return
        emptied = False
        for ino, count in inode_list:
            gen = self.generations.get(ino >> GEN_SHIFT)
            if gen is None:
                continue
            left = gen.lookups.get(ino, 0) - count
            if left > 0:
                gen.lookups[ino] = left
            elif gen.lookups.pop(ino, None) is not None and not gen.lookups:
                emptied = True
        if emptied and len(self.generations) > 1:
            self._retire_unused()

    @_fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            raise ReadOnly("read-only file system")
        attr = self._attrs(inode)
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(attr.st_mode & 0o111) or stat.S_ISDIR(attr.st_mode)
        if ctx.uid == attr.st_uid:
            bits = (attr.st_mode >> 6) & 7
        elif ctx.gid == attr.st_gid:
            bits = (attr.st_mode >> 3) & 7
        else:
            bits = attr.st_mode & 7
        return (mode & bits) == mode

    # -- directories ---------------------------------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._dir_of(inode)
        if self.skip_opendir:
            raise RequestNotNeeded("opendir: no state kept; the kernel need not ask (no-opendir mode)")
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = (inode, self.current)  # a listing continues in the archive it began in
        self.current.handles += 1
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken, inode: int | None = None) -> None:
        # ids: 1 = after ".", 2 = after "..", 3 + p = resume the listing at sorted position p
        # fh 0: no-opendir mode, the listing of the archive served now (it is cached by the kernel
        # until a --follow switch invalidates the directory)
        ino, gen = (inode, self.current) if fh == 0 and inode is not None else self._dir_handles[fh]
        path = self._dir_of(ino)
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", self._attrs(ino), 1):
                return
            start_id = 1
        if start_id < 2:
            parent = self._dir_inode(path.rpartition(b"/")[0]) if path else ROOT_INO
            if not pyfuse3.readdir_reply(token, b"..", self._attrs(parent), 2):
                return
            start_id = 2
        for child in gen.view.children(path, start_id - 3 if start_id >= 3 else 0):
            child_path = self._child_path(path, child.name)
            try:
                attr = self._attrs(self._inode_for(child.entry, child_path, gen))
            except InvalidArchive as exc:  # listed, but unusable: skip it, keep the rest listable
                log.warning("%s", exc)
                continue
            if not pyfuse3.readdir_reply(token, child.name, attr, 3 + child.next_pos):
                return
            if child.entry >= 0:  # readdirplus: the kernel holds the inode now
                self._looked_up(attr.st_ino)

    @_fuse_errors
    async def releasedir(self, fh: int, inode: int | None = None) -> None:
        held = self._dir_handles.pop(fh, None)
        if held is not None:
            held[1].handles -= 1
            if not held[1].handles and held[1] is not self.current:
                self._retire_unused()

    # -- files ---------------------------------------------------------------------------------

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT | os.O_APPEND):
            raise ReadOnly("read-only file system")
        found = self._file_of(inode)
        if found is None:
            self._dir_of(inode)
            raise IsADirectory(f"inode {inode}: is a directory")
        if self.skip_open:
            raise RequestNotNeeded("open: every file is verified before it is served; the kernel need not ask")
        gen, entry = found[0].source_of(found[1])  # unchanged bytes: from an older archive's cache
        handle = await gen.reader.open(entry)
        gen.handles += 1
        keep = await self.pages.dropped(gen.number, entry.number)  # after open: a drop queued while it waited counts
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = (gen, handle)
        # Immutable content: let the kernel keep pages across opens (unless some were wrong).
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int, inode: int | None = None) -> bytes:
        if fh == 0 and inode is not None:
            return await self._read_unopened(inode, off, size)
        gen, handle = self._handles[fh]  # the archive it was opened on, whatever is current now
        return await gen.reader.read(handle, off, size)

    async def _read_unopened(self, inode: int, off: int, size: int) -> bytes:
        """A read in no-open mode: through the inode's handle, opened by its first read (what an
        open did: the poisoned check, a decoded file's store fd, read-ahead state; handles.py)."""

        async def open_file() -> tuple[Generation, Handle]:
            found = self._file_of(inode)
            if found is None:
                self._dir_of(inode)
                raise IsADirectory(f"inode {inode}: is a directory")
            gen, entry = found[0].source_of(found[1])
            return gen, await gen.reader.open(entry)

        held = await self._inode_handles.acquire(inode, open_file)
        try:
            return await held.gen.reader.read(held.handle, off, size)
        finally:
            self._inode_handles.release(held)
            if not held.gen.handles and held.gen is not self.current:
                self._retire_unused()

    @_fuse_errors
    async def flush(self, fh: int, inode: int | None = None) -> None:
        raise RequestNotNeeded("flush: nothing to write back; the kernel need not ask")

    @_fuse_errors
    async def release(self, fh: int, inode: int | None = None) -> None:
        held = self._handles.pop(fh, None)
        if held is not None:
            gen, handle = held
            gen.reader.close(handle)
            gen.handles -= 1
            if not gen.handles and gen is not self.current:
                self._retire_unused()

    # -- metadata ------------------------------------------------------------------------------

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = BLOCK_SIZE_BYTES
        st.f_frsize = BLOCK_SIZE_BYTES
        st.f_blocks = (self.view.blob_size + BLOCK_SIZE_BYTES - 1) // BLOCK_SIZE_BYTES
        st.f_bfree = st.f_bavail = 0
        st.f_files = len(self.view)
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        """None are listed, though getxattr answers every one by name: `cp -a`, `rsync -aX` and
        `tar --xattrs` copy what is listed, and on a copy `user.blobmount.verified` and the rest
        would be stale claims about bytes that no longer live under a mount."""
        if self._entry_of(inode) is None:
            self._dir_of(inode)
        return []

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """user.blobmount.* by name; EOPNOTSUPP for the security.*, trusted.* and POSIX ACL names
        (ls -l then stops asking for security.selinux and the ACL on this mount: the kernel
        caches no negative xattr answer); ENODATA for other names."""
        if name.startswith(UNSUPPORTED_XATTRS):
            raise NotSupported(f"inode {inode}: {show(name)}: no such attributes on this filesystem")
        found = self._file_of(inode)
        if found is None:
            self._dir_of(inode)
            if inode == ROOT_INO and name == ROOT_XATTR_DIGEST:
                return self.current.digest.encode()
            raise NoAttribute(f"inode {inode}: no attribute {show(name)}")
        entry = found[1]
        key = name[len(XATTR_PREFIX) :] if name.startswith(XATTR_PREFIX) else None
        if key == b"sha256":
            return entry.hash.hex().encode()
        if key == b"compression":
            return b"zstd" if entry.compression == COMPRESSION_ZSTD else b"none"
        if key == b"stored_size":
            return str(entry.data_size).encode()
        source, stored = found[0].source_of(entry)
        if key == b"verified":
            return source.reader.state(stored).encode()
        if key == b"cached_bytes" and source.cached_bytes is not None:
            return str(source.cached_bytes(stored)).encode()
        raise NoAttribute(f"{show(entry.path)}: no attribute {show(name)}")

    # -- integrity -----------------------------------------------------------------------------

    def _inodes_reading(self, number: int, entry: Entry) -> list[int]:
        """The inodes whose pages came from `entry` of archive `number`: its own, and a newer
        generation's whose bytes are read from it (:meth:`Generation.source_of`)."""
        gen = self.generations.get(number)
        if gen is None:
            return [(number << GEN_SHIFT) + FILE_INO_BASE + entry.number]
        inodes = [gen.ino(entry.number)]
        for other in self.generations.values():
            if other.number > gen.number:
                found = other.view.find(entry.path)
                if found is not None:
                    with contextlib.suppress(InvalidArchive):
                        if other.source_of(other.view.entry(found)) == (gen, entry):
                            inodes.append(other.ino(found))
        return inodes

    async def invalidator(self) -> None:
        """Long-lived task (started by mount.py in its nursery): drop distrusted files' pages."""
        await self.pages.run(self._inodes_reading)

    async def invalidate_switch(self, old: Generation, changed: Changes) -> int:
        """After :meth:`switch`: make the kernel forget what it cached of `old`. Every name whose
        inode the kernel holds (all files got new numbers) and every added, removed or changed
        name is invalidated, and so is every known directory whose listing or time changed. The
        old files' pages are left alone: no new file has their inode numbers, and a reader holding
        one open keeps them. Returns the invalidations the kernel took."""
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
        return await trio.to_thread.run_sync(invalidate_names, sorted(names), dirs)

    # -- writes: all refused -------------------------------------------------------------------

    async def _erofs(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno_for(ReadOnly()))

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs
    write = create = setxattr = removexattr = _erofs


async def _holds_lazy(view: IndexView, above: int | None) -> bool:
    """Whether any file of `view` is larger than `above` (None: no file is verified lazily). An
    entry whose size cannot be read counts as not lazy: it is never served."""
    if above is None:
        return False
    original_size = view.original_size
    for start in range(0, len(view), DECIDE_SLICE_ENTRIES):
        for number in range(start, min(start + DECIDE_SLICE_ENTRIES, len(view))):
            try:
                if original_size(number) > above:
                    return True
            except InvalidArchive:
                continue
        await trio.lowlevel.checkpoint()  # requests are served between slices
    return False
