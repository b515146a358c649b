"""`blobmount cp`: files of an archive written into a local directory, verified, without a mount.

Three phases, so that a bad request changes nothing on disk:

1. :func:`~.plan.plan` turns the PATH arguments into (entry, path below DEST) pairs. A PATH the archive
   does not have is NotFound, an entry that breaks the format (a hostile path, a file that is also
   a directory) is InvalidArchive -- both before DEST is touched.
2. :class:`~.dest.Dest` prepares DEST: emptied first with ``--clean-dest`` (never ``/``, an ancestor of
   the working directory, or anything overlapping the cache directory), then every directory is
   created and opened one component at a time from DEST's descriptor with ``O_NOFOLLOW``: a
   symbolic link (or a file) in the way is an error, never followed, so nothing is written
   outside DEST whatever the archive's paths or DEST's contents. Files already present are
   skipped (``--overwrite`` replaces them).
3. :func:`~.copy.copy_items` reads the files' bytes in data-blob order, as *pieces*: runs of neighbouring
   small files read with one range request, large files cut at multiples of the piece size. Up to
   ``concurrency`` pieces are read at once, through the archive's own source (a remote archive's
   chunk cache: the same cache directory, chunks and single flight as a mount), and the bytes
   read but not yet written are bounded by ``buffer_bytes``. Pieces are taken and charged to the
   budget in order, and a file's pieces are consumed in order (hashed, or fed to a streaming zstd
   decoder whose output is bounded by the entry's size), so memory stays bounded for any file
   size and the pipeline cannot deadlock: the oldest piece never waits for a younger one. The
   trio thread receives; pieces are consumed on one worker thread at a time (CONSUMER_THREADS).

Every file is written to a temporary name in its own directory, checked against its sha256 and
size, given its mode and times, and only then renamed to its name: a failure never leaves a partial
file under a final name. A file that fails verification from a remote source has its chunks dropped
and is read once more from the origin (as the reader does: a fault on the way must not fail it);
a second mismatch is an IntegrityError (exit 5) naming the file, after the other files are done.
No fsync unless asked (``fsync=True``): like tar and cp, the page cache decides when bytes reach
the disk.

The package, one module per part: :mod:`.options` (what a copy is asked for, what it reports),
:mod:`.plan` (1), :mod:`.dest` (2: DEST opened with ``O_NOFOLLOW``, one component at a time),
:mod:`.pieces` (3: the reads and the memory budget), :mod:`.writer` (3: decoding, verifying and
writing one file, on whichever thread) and :mod:`.copy` (3: the trio pipeline joining them).
"""

from blobmount.extract.copy import copy_items, first_error
from blobmount.extract.dest import check_clean_dest
from blobmount.extract.options import CopyOptions, CopyResult
from blobmount.extract.plan import Item, directory_mtime_ns, plan

__all__ = [
    "CopyOptions",
    "CopyResult",
    "Item",
    "check_clean_dest",
    "copy_items",
    "directory_mtime_ns",
    "first_error",
    "plan",
]
