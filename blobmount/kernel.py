"""What the kernel caches of this mount, and how the daemon makes it forget (pyfuse3 invalidations).

- :class:`PageDrops`: pages of a file the reader no longer trusts (a distrust, a poison, a lazy
  hash state given up: integrity/) are dropped. The reader is given :meth:`PageDrops.for_archive`
  at construction; the drop is queued, never done inside the read request that found it
  (invalidating an inode from its own read request would deadlock on its page locks), and an open
  of the file waits for it (bounded) and then does not keep the kernel's pages.
- :func:`invalidate_names`: after a ``--follow`` switch, the names and directories the kernel
  cached of the old archive.

Concurrency: the queue and the waits are the trio thread's; the invalidation calls run on worker
threads (each may block until a request for that inode is answered).
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from blobmount.index import Entry
from blobmount.index.paths import show

log = logging.getLogger("blobmount.fs")  # the logger these lines always had

INVALIDATE_WAIT_S = 5.0  # an open waits at most this for a queued page drop (normally microseconds)
QUEUE_DROPS = 1024  # page drops waiting at most; more are logged and left (the pages may linger)


class PageDrops:
    """Queued page drops of distrusted files, keyed by (archive generation, entry number)."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[tuple[int, Entry]](QUEUE_DROPS)
        self._pending: dict[tuple[int, int], tuple[int, trio.Event]] = {}  # key -> (queued, set when done)

    def for_archive(self, generation: int) -> Callable[[Entry], None]:
        """What the reader of archive `generation` is built with (its `drop_pages`)."""
        return functools.partial(self.distrusted, generation)

    def distrusted(self, generation: int, entry: Entry) -> None:
        """Pages of `entry` (of archive `generation`) the kernel holds may be wrong: drop them."""
        try:
            self._send.send_nowait((generation, entry))
        except trio.WouldBlock:
            log.warning("%s: invalidation queue full; cached pages may linger", show(entry.path))
            return
        key = (generation, entry.number)
        queued, done = self._pending.get(key, (0, trio.Event()))
        self._pending[key] = (queued + 1, done)

    async def dropped(self, generation: int, number: int) -> bool:
        """Before an open is answered: wait (bounded) until pages queued for dropping are gone;
        whether the open may keep the kernel's pages (not after a drop: none is to be trusted)."""
        pending = self._pending.get((generation, number))
        if pending is None:
            return True
        with trio.move_on_after(INVALIDATE_WAIT_S):
            await pending[1].wait()
        return False

    async def run(self, inodes: Callable[[int, Entry], list[int]]) -> None:
        """Long-lived task (started by mount.py in its nursery): drop the pages of the inodes that
        read a distrusted entry (`inodes(generation, entry)`: the filesystem knows them)."""
        async for generation, entry in self._recv:
            try:
                for ino in inodes(generation, entry):
                    try:
                        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
                    except OSError as exc:
                        if exc.errno != errno.ENOENT:  # ENOENT: the kernel no longer knows the inode
                            log.warning("invalidate inode %d: %s", ino, exc)
            finally:
                key = (generation, entry.number)
                queued, done = self._pending.pop(key, (1, trio.Event()))
                if queued > 1:
                    self._pending[key] = (queued - 1, done)
                else:
                    done.set()


def invalidate_names(names: list[tuple[int, bytes]], dirs: list[int]) -> int:
    """On a worker thread: each call may block until a request for that directory is answered.
    Returns the invalidations the kernel took."""
    done = 0
    for parent, name in names:
        done += _kernel(pyfuse3.invalidate_entry, parent, name)
    for ino in dirs:
        done += _kernel(pyfuse3.invalidate_inode, ino, False)
    return done


def _kernel(call: Callable[..., None], *args: Any) -> int:
    try:
        call(*args)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: the kernel did not hold it
            log.warning("%s%r: %s", call.__name__, args, exc)
        return 0
    return 1
