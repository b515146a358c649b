"""Read-ahead: the state one open file (or one directory of small files) carries between reads,
and the window policy the fetcher applies to it.

The reader creates a :class:`ReadHint` per open file or directory and passes it with each read;
only the fetcher (fetch.py, through :func:`advance`) reads and changes it. Local sources ignore
hints (the kernel's page cache does their read-ahead).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ReadHint:
    """Where a series of reads may go next, so a remote source can fetch ahead: the bytes of one
    open file, or the data of one directory's small files (``directory``). The reader creates one
    per open file or directory; the source keeps its read-ahead state in it. Local sources ignore
    hints (the kernel's page cache does their read-ahead)."""

    lo: int  # the data-blob range the reads stay within
    hi: int
    directory: bool = False
    pos: int = -1  # end of the last read in order
    window: int = 0  # current read-ahead window, bytes
    ahead: int = 0  # how far read-ahead has been requested
    misses: int = 0  # reads that needed the network (directories prefetch from the second on)
    keep: bool = True  # False: chunks fetched for these reads stay in memory, not on disk (the
    # reader keeps the bytes elsewhere: a zstd frame decoded into the content store)


DEFAULT_AHEAD_BYTES = 32 << 20  # a sequential reader's largest window: ~0.3 s at 1 Gbit, 25x the
# bandwidth-delay product of a 10 ms link, and half the memory tier (a larger window outran the
# tier: landed chunks were evicted before the reader got there and read back from disk)
INITIAL_WINDOW_BYTES = 1 << 20  # the first read-ahead after two reads in order
DIR_STEP_BYTES = 2 << 20  # a directory of small files is prefetched this much ahead at first,
DIR_MAX_BYTES = 32 << 20  # doubling while the reader keeps up, to at most this much


def advance(hint: ReadHint, start: int, end: int, missed: bool, slack: int, max_window: int) -> tuple[int, int] | None:
    """A read of [start, end) was made under `hint` (`missed`: it needed the network): move the
    hint's window and return the bytes to fetch ahead now, or None.

    A file read in order (within `slack` bytes of where the last read ended: the kernel reorders a
    little) grows its window from ``INITIAL_WINDOW_BYTES``, doubling to `max_window`; a seek resets
    it. A directory of small files prefetches nothing on its first network miss (one file is not a
    pattern); from the second on, its data (contiguous: the data blob is in path order) is fetched
    forward in a window growing from ``DIR_STEP_BYTES`` to ``DIR_MAX_BYTES``. Either asks for more
    only once the reader has used half of what was asked for before."""
    if hint.directory:
        if missed:
            hint.misses += 1
        if hint.misses < 2 or hint.ahead - end >= hint.window // 2:
            return None
        hint.window = min(max(hint.window * 2, DIR_STEP_BYTES), DIR_MAX_BYTES)
        frm, to = max(hint.ahead, end), min(hint.hi, end + hint.window)
    else:
        in_order = hint.pos >= 0 and hint.pos - slack <= start <= hint.pos + slack
        if in_order:
            hint.window = min(max(hint.window * 2, INITIAL_WINDOW_BYTES), max_window)
            hint.pos = max(hint.pos, end)
        else:
            hint.window, hint.ahead, hint.pos = 0, 0, end
            return None
        if hint.ahead - hint.pos >= hint.window // 2:
            return None
        frm, to = max(hint.ahead, hint.pos), min(hint.hi, hint.pos + hint.window)
    if to <= frm:
        return None
    hint.ahead = to
    return frm, to
