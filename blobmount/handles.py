"""The read state of files read without an open: the kernel's no-open mode (fs.py).

Once the filesystem has answered an open with ENOSYS, the kernel opens files without asking and
every read arrives with fh 0 and the inode (patches/pyfuse3-3.5.0-pass-inode.patch). What a real
open set up (reader.py's :class:`~blobmount.reader.Handle`: the file's entry, a decoded file's fd in
the content store, a large raw file's read-ahead state, the check that the file is not poisoned) is
then set up by the first read of an inode and kept here, per inode, between reads:

- bounded: at most ``INODE_HANDLES`` idle ones, least recently read first out (closed through their
  reader, which releases a content-store fd); a handle a read is using is never closed;
- single flight: concurrent first reads of one inode (the kernel's read-ahead sends several) share
  one :meth:`~blobmount.reader.Reader.open`; a failed open (a poisoned file: EIO) is not kept;
- a small file's verified bytes are let go when no read uses its handle (the reader's memory LRU
  keeps them within its budget), so the table holds fds and read-ahead state, not file contents.

Only files whose every byte is verified before it is served are read this way (fs.py decides):
they need no per-open distrust count. Touched only from the trio thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from blobmount.generations import Generation
from blobmount.reader import Handle

INODE_HANDLES = 256  # idle per-inode handles kept: a content-store fd each at most; a directory's
# worth of files read one after another reuse theirs, and 256 fds stay far below any RLIMIT_NOFILE


@dataclass(eq=False, slots=True)
class Held:
    """One inode's handle, the generation whose reader opened it, and the reads using it now."""

    gen: Generation
    handle: Handle
    busy: int = 0


class InodeHandles:
    """Per-inode handles of files read without an open (module docstring)."""

    def __init__(self, limit: int = INODE_HANDLES) -> None:
        self.limit = limit
        self._held: OrderedDict[int, Held] = OrderedDict()
        self._opening: dict[int, trio.Event] = {}

    def __len__(self) -> int:
        return len(self._held)

    async def acquire(self, ino: int, open_file: Callable[[], Awaitable[tuple[Generation, Handle]]]) -> Held:
        """The handle of `ino` for one read (:meth:`release` it after), opened by `open_file` if
        there is none."""
        while (held := self._held.get(ino)) is None:
            opening = self._opening.get(ino)
            if opening is None:
                done = self._opening[ino] = trio.Event()
                try:
                    gen, handle = await open_file()
                finally:
                    del self._opening[ino]
                    done.set()
                held = self._held[ino] = Held(gen, handle)
                break
            await opening.wait()  # and look again: it may have failed
        self._held.move_to_end(ino)
        held.busy += 1
        held.gen.handles += 1  # a read in flight keeps its generation (and its data source) alive
        return held

    def release(self, held: Held) -> None:
        """A read is done with `held`; idle handles beyond the limit are closed."""
        held.busy -= 1
        held.gen.handles -= 1
        if not held.busy and held.handle.small:
            held.handle.content = None  # the reader's memory LRU has it (or loads it again)
        while len(self._held) > self.limit:
            ino = next((i for i, h in self._held.items() if not h.busy), None)
            if ino is None:
                return  # every one is being read: over the limit until the reads end
            self._close(ino)

    def drop_generation(self, gen: Generation) -> None:
        """Close the idle handles opened through `gen` (it is being retired: none is busy)."""
        for ino in [i for i, h in self._held.items() if h.gen is gen and not h.busy]:
            self._close(ino)

    def _close(self, ino: int) -> None:
        held = self._held.pop(ino)
        held.gen.reader.close(held.handle)
