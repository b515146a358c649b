"""Read-ahead: the state one open file (or one directory of small files) carries between reads,
and the window policy the fetcher applies to it.

The reader creates a :class:`ReadHint` per open file or directory and passes it with each read;
only the fetcher (fetch.py) reads and changes it. Local sources ignore hints (the kernel's page
cache does their read-ahead).
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
