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

Every handler runs inside :func:`~blobmount.handler.fuse_errors` (errors to errnos, the deadline,
metrics). What the handlers stand on: the archives served and their generations (served.py, the
base class), the inode model and attributes (inodes.py), the reader of each archive (reader.py),
the kernel's caches (kernel.py).
"""

from __future__ import annotations

import logging
import math
import os
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyfuse3
import trio

from blobmount.errors import (
    InvalidArchive,
    IsADirectory,
    NoAttribute,
    NotFound,
    NotSupported,
    ReadOnly,
    RequestNotNeeded,
    errno_for,
)
from blobmount.generations import DEFAULT_KEEP, Changes, Generation
from blobmount.generations import FILE_INO_BASE as FILE_INO_BASE
from blobmount.handler import fuse_errors
from blobmount.index import COMPRESSION_ZSTD, Entry, IndexView
from blobmount.index.paths import show
from blobmount.inodes import ROOT_INO as ROOT_INO
from blobmount.inodes import Inodes
from blobmount.kernel import PageDrops, invalidate_names
from blobmount.reader import Handle, Reader
from blobmount.served import ServedArchives, holds_lazy
from blobmount.sources.base import Archive

log = logging.getLogger(__name__)

BLOCK_SIZE_BYTES = 4096  # statfs unit
XATTR_PREFIX = b"user.blobmount."
XATTRS = (b"sha256", b"compression", b"stored_size", b"verified")  # and cached_bytes: by name only
ROOT_XATTR_DIGEST = XATTR_PREFIX + b"digest"  # on the root: the archive being served (--follow moves it)
# xattr namespaces no file here has (no labels, no ACLs in the format): EOPNOTSUPP (errors.NotSupported)
UNSUPPORTED_XATTRS = (b"security.", b"trusted.", b"system.posix_acl_")
# pyfuse3 built with patches/pyfuse3-3.5.0-pass-inode.patch (make venv): read/readdir/release get the
# inode, which the kernel's no-open mode needs (its requests carry fh 0)
PYFUSE3_PASSES_INODE = "pass_inode" in vars(pyfuse3.Operations)


class BlobFS(ServedArchives, pyfuse3.Operations):
    """A read-only filesystem over one archive (or, under --follow, the archives of a tag)."""

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
        pyfuse3.Operations.__init__(self)
        when = time.time_ns() if dir_time_ns is None else dir_time_ns
        gen = Generation(0, archive, view, reader, when, cached_bytes=cached_bytes)
        ServedArchives.__init__(self, gen, pages=pages, keep=keep, follows=follows)
        self.deadline_s = deadline_s
        self.inodes = Inodes(self, uid=uid, gid=gid, timeout_s=timeout_s)
        self._handles: dict[int, tuple[Generation, Handle]] = {}
        self._dir_handles: dict[int, tuple[int, Generation]] = {}
        self._next_fh = 1
        # the kernel's no-open mode (module docstring): opens answered ENOSYS once decide_opens says so
        self.skip_open = False

    @property
    def skip_opendir(self) -> bool:
        """Whether opendir answers ENOSYS (no-opendir mode). Not under --follow: there a listing
        already begun continues in the archive it began in (README, Following a tag), which
        needs its opendir; the kernel's cached listing could not say which archive it is from."""
        return PYFUSE3_PASSES_INODE and not self.follows

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
        if await holds_lazy(gen.view, gen.reader.lazy_above()):
            log.info(
                "the archive holds files verified as they are read (larger than --verify-threshold):"
                " every open reaches the daemon (an open before a mismatch must fail)"
            )
        elif self.current is gen and gen.number == 0:
            self.skip_open = True
            log.debug("every file is verified before it is served: opens answered ENOSYS (no-open mode)")

    # -- lookups -------------------------------------------------------------------------------

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.dir_of(parent_inode)
        if name == b".":
            return self.inodes.attrs(parent_inode)
        if name == b"..":
            return self.inodes.attrs(self.inodes.dir_inode(parent.rpartition(b"/")[0]))
        if b"/" in name or not name:
            raise NotFound(f"{show(name)}: no such name")
        path = self.inodes.child_path(parent, name)
        kind = self.view.kind(path)
        if kind is None:
            raise NotFound(f"{show(path)}: no such file or directory")
        ino = self.inodes.inode_for(kind, path)
        attr = self.inodes.attrs(ino)
        if kind >= 0:
            self._looked_up(ino)
        return attr

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self.inodes.attrs(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Count down the kernel's lookups of file inodes (served.py)."""
        self.forgotten(inode_list)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            raise ReadOnly("read-only file system")
        attr = self.inodes.attrs(inode)
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

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.inodes.dir_of(inode)
        if self.skip_opendir:
            raise RequestNotNeeded("opendir: no state kept; the kernel need not ask (no-opendir mode)")
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = (inode, self.current)  # a listing continues in the archive it began in
        self.current.handles += 1
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken, inode: int | None = None) -> None:
        # ids: 1 = after ".", 2 = after "..", 3 + p = resume the listing at sorted position p
        # fh 0: no-opendir mode, the listing of the archive served now (it is cached by the kernel
        # until a --follow switch invalidates the directory)
        ino, gen = (inode, self.current) if fh == 0 and inode is not None else self._dir_handles[fh]
        path = self.inodes.dir_of(ino)
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", self.inodes.attrs(ino), 1):
                return
            start_id = 1
        if start_id < 2:
            parent = self.inodes.dir_inode(path.rpartition(b"/")[0]) if path else ROOT_INO
            if not pyfuse3.readdir_reply(token, b"..", self.inodes.attrs(parent), 2):
                return
            start_id = 2
        # each file with its validated entry, read once per listing (IndexView.child_entries)
        for child, found in gen.view.child_entries(path, start_id - 3 if start_id >= 3 else 0):
            try:
                if isinstance(found, InvalidArchive):
                    raise found
                if found is None:
                    child_path = self.inodes.child_path(path, child.name)
                    attr = self.inodes.dir_attrs(self.inodes.dir_inode(child_path), child_path)
                else:
                    attr = self.inodes.file_attrs(gen.ino(child.entry), found)
            except InvalidArchive as exc:  # listed, but unusable: skip it, keep the rest listable
                log.warning("%s", exc)
                continue
            if not pyfuse3.readdir_reply(token, child.name, attr, 3 + child.next_pos):
                return
            if child.entry >= 0 and self.follows:  # readdirplus: the kernel holds the inode now
                self._looked_up(attr.st_ino)

    @fuse_errors
    async def releasedir(self, fh: int, inode: int | None = None) -> None:
        held = self._dir_handles.pop(fh, None)
        if held is not None:
            held[1].handles -= 1
            if not held[1].handles and held[1] is not self.current:
                self._retire_unused()

    # -- files ---------------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT | os.O_APPEND):
            raise ReadOnly("read-only file system")
        found = self.file_of(inode)
        if found is None:
            self.inodes.dir_of(inode)
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

    @fuse_errors
    async def read(self, fh: int, off: int, size: int, inode: int | None = None) -> bytes | memoryview:  # type: ignore[override]
        # pyfuse3 replies from any buffer at once and keeps nothing: a view saves a copy (read_view)
        if fh == 0 and inode is not None:
            return await self._read_unopened(inode, off, size)
        gen, handle = self._handles[fh]  # the archive it was opened on, whatever is current now
        return await gen.reader.read_view(handle, off, size)

    async def _read_unopened(self, inode: int, off: int, size: int) -> bytes | memoryview:
        """A read in no-open mode: through the inode's handle, opened by its first read (what an
        open did: the poisoned check, a decoded file's store fd, read-ahead state; handles.py)."""

        async def open_file() -> tuple[Generation, Handle]:
            found = self.file_of(inode)
            if found is None:
                self.inodes.dir_of(inode)
                raise IsADirectory(f"inode {inode}: is a directory")
            gen, entry = found[0].source_of(found[1])
            return gen, await gen.reader.open(entry)

        held = await self._inode_handles.acquire(inode, open_file)
        try:
            return await held.gen.reader.read_view(held.handle, off, size)
        finally:
            self._inode_handles.release(held)
            if not held.gen.handles and held.gen is not self.current:
                self._retire_unused()

    @fuse_errors
    async def flush(self, fh: int, inode: int | None = None) -> None:
        raise RequestNotNeeded("flush: nothing to write back; the kernel need not ask")

    @fuse_errors
    async def release(self, fh: int, inode: int | None = None) -> None:
        held = self._handles.pop(fh, None)
        if held is not None:
            gen, handle = held
            gen.reader.close(handle)
            gen.handles -= 1
            if not gen.handles and gen is not self.current:
                self._retire_unused()

    # -- metadata ------------------------------------------------------------------------------

    @fuse_errors
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

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        """None are listed, though getxattr answers every one by name: `cp -a`, `rsync -aX` and
        `tar --xattrs` copy what is listed, and on a copy `user.blobmount.verified` and the rest
        would be stale claims about bytes that no longer live under a mount."""
        if self.inodes.entry_of(inode) is None:
            self.inodes.dir_of(inode)
        return []

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """user.blobmount.* by name; EOPNOTSUPP for the security.*, trusted.* and POSIX ACL names
        (ls -l then stops asking for security.selinux and the ACL on this mount: the kernel
        caches no negative xattr answer); ENODATA for other names."""
        if name.startswith(UNSUPPORTED_XATTRS):
            raise NotSupported(f"inode {inode}: {show(name)}: no such attributes on this filesystem")
        found = self.file_of(inode)
        if found is None:
            self.inodes.dir_of(inode)
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

    async def invalidate_switch(self, old: Generation, changed: Changes) -> int:
        """After :meth:`switch`: make the kernel forget what it cached of `old`. Every name whose
        inode the kernel holds (all files got new numbers) and every added, removed or changed
        name is invalidated, and so is every known directory whose listing or time changed. The
        old files' pages are left alone: no new file has their inode numbers, and a reader holding
        one open keeps them. Returns the invalidations the kernel took."""
        names, dirs = self.inodes.names_after_switch(old, changed)
        return await trio.to_thread.run_sync(invalidate_names, names, dirs)

    # -- writes: all refused -------------------------------------------------------------------

    async def _erofs(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno_for(ReadOnly()))

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs
    write = create = setxattr = removexattr = _erofs
