"""The archives a mount serves: the current one and, under ``--follow``, older generations kept
while the kernel or an open file still uses them (generations.py numbers their inodes).

A base class of :class:`blobmount.fs.BlobFS`: it owns the generations, their retirement, the
kernel's lookup counts, the per-inode handles of the no-open mode and the page drops of
distrusted files (kernel.py); the handlers (fs.py) only ask it which archive and entry an inode
is. Touched only from the trio thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import trio

from blobmount.daemon import metrics
from blobmount.errors import InvalidArchive
from blobmount.generations import FILE_INO_BASE, GEN_SHIFT, Generation
from blobmount.handles import InodeHandles
from blobmount.index import Entry, IndexView
from blobmount.kernel import PageDrops
from blobmount.reader import Reader
from blobmount.sources.base import Archive

DECIDE_SLICE_ENTRIES = 4096  # entries read between checkpoints of decide_opens (~10 ms of the trio thread)


class ServedArchives:
    """The archives served, and what the kernel holds of each (module docstring)."""

    def __init__(
        self,
        generation: Generation,
        *,
        pages: PageDrops | None,
        keep: int,
        follows: bool,
    ) -> None:
        self.current = generation  # the archive served (generation 0 until --follow switches)
        self.generations: dict[int, Generation] = {generation.number: generation}
        self.keep = keep  # generations alive at most
        self.follows = follows  # the kernel's lookups are counted (nothing to free otherwise)
        self._retired: list[Generation] = []  # dropped, their data sources still to close
        self.pages = pages or PageDrops()
        self._inode_handles = InodeHandles()  # the kernel's no-open mode (fs.py)

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

    def take_retired(self) -> list[Generation]:
        """Generations dropped since the last call, for the caller to close their data sources."""
        retired, self._retired = self._retired, []
        return retired

    def file_of(self, ino: int) -> tuple[Generation, Entry] | None:
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

    def forgotten(self, inode_list: Sequence[tuple[int, int]]) -> None:
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


async def holds_lazy(view: IndexView, above: int | None) -> bool:
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
