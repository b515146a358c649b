"""Calling the filesystem's handlers without the kernel (tests/fs): the one place a test builds a
:class:`BlobFS` (so a change of how it is constructed is made here once), a request context, the
errno a handler answers with, and the walks a kernel would make (lookup by path, open-read-release,
readdir with its offsets).

:func:`blob_fs` wires an archive as mount.py's ``serve`` does (view, reader with the directory
spans, filesystem); :func:`serving` also opens SOURCE as the mount's parent does (a local
directory, an ``oci:`` layout or a registry reference through ``open_remote``, the index checked
through ``index_view``) and gives the data source and the reader a nursery, as ``_serve`` does.
The one kernel call a handler path makes, ``pyfuse3.invalidate_inode`` (the reader distrusted a
file's pages), is recorded instead of sent: there is no kernel to drop them.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from blobmount.cache import DEFAULT_CACHE_SIZE_BYTES, CacheDir, ContentStore
from blobmount.config import CacheConfig, FollowConfig, MountConfig, VerifyConfig
from blobmount.daemon.control import DaemonState
from blobmount.follow import Follower, cached_bytes_of, index_view
from blobmount.fs import ROOT_INO, BlobFS
from blobmount.index import IndexView
from blobmount.kernel import PageDrops
from blobmount.prefetch import ranges_for
from blobmount.reader import Reader, ReaderConfig
from blobmount.registry.client import RegistryOptions
from blobmount.sources import RemoteSettings, is_local, open_source
from blobmount.sources.base import Archive, Fetching, RangeSource
from tests.support.aio import run

CTX = pyfuse3.RequestContext()
READ_BYTES = 128 << 10  # the kernel's FUSE read size
MAX_REQUESTS = 1 << 16  # bound of one walk: 8 GiB of reads, or a listing of millions of entries


def fuse_errno(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(fn, *args)
    return info.value.errno


async def answer(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    """The handler's result, or the errno it answered (an int) as a kernel would pass it on."""
    try:
        return await fn(*args)
    except pyfuse3.FUSEError as exc:
        return exc.errno


# -- building the filesystem ----------------------------------------------------------------------


def reader_for(
    archive: Archive,
    store: ContentStore | Path,
    config: ReaderConfig | None = None,
    *,
    view: IndexView | None = None,
    data: RangeSource | None = None,
    pages: PageDrops | None = None,
) -> Reader:
    """The reader mount.py builds for `archive` (`data`: its data source wrapped, for a fault;
    `pages`: the filesystem's page drops, which the reader's distrust feeds)."""
    store = store if isinstance(store, ContentStore) else ContentStore(store)
    view = view if view is not None else IndexView(archive.index_bytes, blob_size=archive.data.size)
    drop = pages.for_archive(0) if pages is not None else None
    return Reader(data if data is not None else archive.data, store, config, drop_pages=drop, dir_span=view.data_span)


def blob_fs(
    archive: Archive,
    store: ContentStore | Path,
    config: ReaderConfig | None = None,
    *,
    view: IndexView | None = None,
    data: RangeSource | None = None,
    **options: Any,
) -> BlobFS:
    """The filesystem over `archive` as mount.py builds it; `options` are BlobFS's own (uid, gid,
    dir_time_ns, deadline_s...). `view`: a view of the index (a subclass, to break or count)."""
    view = view if view is not None else IndexView(archive.index_bytes, blob_size=archive.data.size)
    pages = PageDrops()
    reader = reader_for(archive, store, config, view=view, data=data, pages=pages)
    return BlobFS(view, reader, archive=archive, pages=pages, **options)


@dataclass
class Served:
    """A filesystem being served without a kernel: what :func:`serving` yields."""

    fs: BlobFS
    archive: Archive
    cache: Path
    dropped: list[int] = field(default_factory=list)  # inodes whose kernel pages the daemon dropped
    forgotten: list[tuple[int, bytes]] = field(default_factory=list)  # (parent, name) entries invalidated
    follower: Follower | None = None  # with follow_interval_s: the --follow task, running


@contextlib.asynccontextmanager
async def serving(
    source: str,
    cache: Path,
    config: ReaderConfig | None = None,
    *,
    options: RegistryOptions | None = None,
    offline: bool = False,
    cache_size: int = DEFAULT_CACHE_SIZE_BYTES,
    prefetch: tuple[str, ...] = (),
    decide_opens: bool = False,
    follow_interval_s: float | None = None,
    **fs_options: Any,
) -> AsyncIterator[Served]:
    """SOURCE opened and served as a mount serves it, minus the kernel (module docstring), with
    ``--cache-size`` `cache_size`. `prefetch`: the ``--prefetch`` paths, fetched into the cache
    before the filesystem is handed over (a mount does it right after READY). `decide_opens`:
    the no-open decision taken first, as a mount takes it once it is up. `follow_interval_s`:
    ``--follow`` with that interval (its Follower in ``Served.follower``; ``wake()`` is SIGHUP)."""
    cache_dir = CacheDir(cache, cache_size)
    if is_local(source):
        archive = await open_source(source)
    else:
        archive = await open_source(source, options or RegistryOptions(), RemoteSettings(cache_dir, None, offline))
    fs: BlobFS | None = None
    try:
        view = index_view(archive, cache_dir)
        fs_options.setdefault("cached_bytes", cached_bytes_of(archive.data))
        if follow_interval_s is not None:  # --follow: the filesystem is built knowing it (mount.py)
            fs_options.setdefault("follows", True)
        fs = blob_fs(archive, ContentStore(cache_dir), config, view=view, dir_time_ns=archive.created_ns, **fs_options)
        served = Served(fs, archive, cache)
        real_invalidate, real_forget = pyfuse3.invalidate_inode, pyfuse3.invalidate_entry

        def drop(inode: int, attr_only: bool = False) -> None:
            served.dropped.append(inode)

        def forget(inode_p: int, name: bytes, deleted: int = 0) -> None:
            served.forgotten.append((inode_p, name))

        pyfuse3.invalidate_inode, pyfuse3.invalidate_entry = drop, forget
        try:
            async with trio.open_nursery() as nursery:
                if isinstance(archive.data, Fetching):
                    archive.data.attach(nursery)
                fs.reader.attach(nursery)
                nursery.start_soon(fs.invalidator)
                if prefetch and isinstance(archive.data, Fetching):
                    await archive.data.fill(ranges_for(view, prefetch))
                if decide_opens:
                    await fs.decide_opens()
                if follow_interval_s is not None:
                    served.follower = _follower(source, cache, fs, archive, config, options, follow_interval_s)
                    nursery.start_soon(served.follower.run)
                yield served
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.invalidate_inode, pyfuse3.invalidate_entry = real_invalidate, real_forget
    finally:
        # every archive still open, as mount.py closes them: after --follow switches, more than one
        opened = [archive]
        if fs is not None:
            gens = [*fs.generations.values(), *fs.take_retired()]
            opened += [g.archive for g in gens if g.archive is not None and g.archive is not archive]
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for one in opened:
                await one.data.aclose()
        for one in opened:
            one.data.close()
        cache_dir.close()  # its lock file: a daemon's exit closes it
        # Fetches cancelled on the way out leave async generators (response bodies) in reference
        # cycles; collected here, inside this trio run, trio finalizes them. Collected later, after
        # the run, they would warn in whichever test runs then (a daemon's run ends with its process).
        gc.collect()


def _follower(
    source: str,
    cache: Path,
    fs: BlobFS,
    archive: Archive,
    config: ReaderConfig | None,
    options: RegistryOptions | None,
    interval_s: float,
) -> Follower:
    """The --follow task mount.py starts, with the settings `serving` was given."""
    reader = config or ReaderConfig()
    mount = MountConfig(
        source=source,
        mountpoint=cache / "mountpoint",  # named in status only: nothing is mounted
        cache=CacheConfig(dir=cache),
        verify=VerifyConfig(reader.verify, reader.verify_threshold),
        registry=options or RegistryOptions(),
        follow=FollowConfig(enabled=True, interval_s=interval_s),
    )
    assert fs.follows, "serving(follow_interval_s=...) builds the filesystem with follows=True"
    store = fs.reader.store
    view = fs.view
    state = DaemonState(
        mountpoint=mount.mountpoint,
        source=source,
        pinned=archive.name,
        index_digest=archive.index_digest,
        data_digest=f"sha256:{view.data_hash.hex()}" if view.data_hash else None,
        entries=len(view),
        data_size=view.blob_size,
        cache_dir=cache,
        cache_limit=mount.cache.size_bytes,
    )
    return Follower(mount, store.cache, store, fs, state)


# -- what a kernel would ask ----------------------------------------------------------------------


async def inode_of(fs: BlobFS, path: bytes | str) -> int:
    """Looked up name by name from the root, as the kernel resolves a path."""
    raw = os.fsencode(path)
    ino = ROOT_INO
    for name in raw.split(b"/") if raw else ():
        ino = (await fs.lookup(ino, name, CTX)).st_ino
    return ino


async def read_file(fs: BlobFS, path: bytes | str, offset: int = 0, size: int | None = None) -> bytes | int:
    """open, reads of READ_BYTES from `offset` (to the end, or `size` bytes), release: the bytes,
    or the errno of the first call that failed (as a program reading the file would see it). An
    open answered ENOSYS is the no-open mode: the reads go with fh 0 and the inode, and no release
    is sent, as the kernel does it."""
    try:
        ino = await inode_of(fs, path)
        fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
    except pyfuse3.FUSEError as exc:
        if exc.errno != errno.ENOSYS:
            return exc.errno
        return await read_handle(fs, 0, offset, size, inode=ino)
    try:
        return await read_handle(fs, fh, offset, size)
    finally:
        await fs.release(fh)


async def read_handle(
    fs: BlobFS, fh: int, offset: int = 0, size: int | None = None, *, inode: int | None = None
) -> bytes | int:
    """Reads of one open file (fh 0 and `inode`: the no-open mode) until its end or `size` bytes."""
    out: list[bytes | memoryview] = []  # read() may give views (fs.py): joined at the end
    pos = offset
    end = None if size is None else offset + size
    for _ in range(MAX_REQUESTS):
        if end is not None and pos >= end:
            break
        n = READ_BYTES if end is None else min(READ_BYTES, end - pos)
        try:
            block = await (fs.read(fh, pos, n) if inode is None else fs.read(fh, pos, n, inode))
        except pyfuse3.FUSEError as exc:
            return exc.errno
        if not block:
            break
        out.append(block)
        pos += len(block)
    else:
        raise AssertionError(f"fh {fh}: still reading after {MAX_REQUESTS} requests")
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class Listed:
    name: bytes
    attr: pyfuse3.EntryAttributes
    next_id: int  # the offset the kernel passes back to resume after this entry


@contextlib.contextmanager
def _replies(into: list[Listed], room: int | None) -> Any:
    """pyfuse3.readdir_reply answered into `into`; with `room`, the kernel's buffer holds that many."""

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if room is not None and len(into) >= room:
            return False
        into.append(Listed(name, attr, next_id))
        return True

    real = pyfuse3.readdir_reply
    pyfuse3.readdir_reply = reply
    try:
        yield
    finally:
        pyfuse3.readdir_reply = real


async def readdir_once(fs: BlobFS, fh: int, ino: int, start_id: int, room: int | None = None) -> list[Listed]:
    """One readdir request from `start_id`, the kernel's buffer holding `room` entries (fh 0: the
    no-opendir mode, where the request names the inode)."""
    got: list[Listed] = []
    with _replies(got, room):
        await fs.readdir(fh, start_id, None, ino)  # type: ignore[arg-type]
    return got


async def list_dir(fs: BlobFS, ino: int, room: int | None = None) -> list[Listed]:
    """opendir (ENOSYS: the no-opendir mode, fh 0), readdir requests resumed at each last offset
    until one adds nothing, releasedir: the listing `ls -a -f` gets (with `room` entries per
    request, as many requests as that takes)."""
    try:
        fh = await fs.opendir(ino, CTX)
    except pyfuse3.FUSEError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        fh = 0
    try:
        out: list[Listed] = []
        start = 0
        for _ in range(MAX_REQUESTS):
            got = await readdir_once(fs, fh, ino, start, room)
            if not got:
                return out
            out.extend(got)
            start = got[-1].next_id
        raise AssertionError(f"readdir of inode {ino}: still listing after {MAX_REQUESTS} requests")
    finally:
        if fh:
            await fs.releasedir(fh)


async def until(check: Callable[[], Awaitable[bool]], what: str, guard_s: float = 60.0, poll_s: float = 0.05) -> None:
    """Wait for a state the daemon reaches in the background (a verification, a re-read), at most
    `guard_s` (a hang guard: the wait is over as soon as `check` holds)."""
    for _ in range(max(1, int(guard_s / poll_s))):
        if await check():
            return
        await trio.sleep(poll_s)
    raise AssertionError(f"{what}: not within {guard_s:g} s")


async def verified_state(fs: BlobFS, path: bytes | str) -> bytes:
    """The user.blobmount.verified xattr of `path`."""
    return await fs.getxattr(await inode_of(fs, path), b"user.blobmount.verified", CTX)
