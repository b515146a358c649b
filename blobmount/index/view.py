"""Read-only view of an index blob: lookup, directory listing and validated entries.

The FlatBuffers reads and the entry order are :mod:`.tables`' (bounds-checked, nothing built per
entry at open); searches use the order found there.

Per-entry rules (path syntax, required fields, hash length, compression, sizes, offsets within the
data blob) are checked by :meth:`IndexView.entry` before an entry is used; nothing unchecked is ever
returned as an :class:`Entry`. Every failure is an :class:`InvalidArchive` with its own message.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from blobmount.errors import InvalidArchive, NotADirectory, NotFound
from blobmount.index.format import (
    _E_COMP,
    _E_GID,
    _E_HASH,
    _E_MODE,
    _E_MTIME,
    _E_OFFSET,
    _E_ORIG,
    _E_SIZE,
    _E_UID,
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    HASH_SIZE_BYTES,
    MAX_FILE_SIZE_BYTES,
    Child,
    Entry,
    EntryLayout,
    Order,
    _i8,
    _i32,
    _i64,
    _u16,
    _u16s,
    _u32,
    entry_layout,
)
from blobmount.index.paths import name_problem, path_problem, show
from blobmount.index.tables import IndexTables

log = logging.getLogger(__name__)

_LAYOUTS_KEPT = 1024  # vtable positions whose entry layout is kept (FlatBuffers builders share vtables: a few)
_EXTENT_CACHE_SIZE = 65536  # directory extents kept (~10 MiB at most; a directory each)
Listed = tuple[Child, Entry | InvalidArchive | None]  # IndexView.child_entries: a file's entry or why not

_ENTRY_CACHE_SIZE = 32768  # validated entries kept (~8 MiB): a tree walk that opens every file of a
# 25k-file tree validated each entry 2-3 times with 4096; bounded so memory never grows with the archive


class IndexView(IndexTables):
    """A validated-on-demand view of one index blob (see the module docstring)."""

    __slots__ = ("_entries_cache", "_extents", "_layouts")

    def __init__(self, buf: bytes, *, blob_size: int | None = None, known_order: bytes | None = None) -> None:
        """See :class:`IndexTables`; the view adds a bounded cache of validated entries and one of
        directory extents."""
        super().__init__(buf, blob_size=blob_size, known_order=known_order)
        self._entries_cache: dict[int, Entry] = {}
        # directory path -> its sorted positions [first, end), for every directory a listing offered:
        # a walk lists each directory twice (its parent's readdirplus needs its nlink and time) and
        # found its extent in its parent's listing, by two binary searches of the whole index each
        self._extents: dict[bytes, tuple[int, int]] = {}
        self._layouts: dict[int, EntryLayout | None] = {}  # vtable position -> its entry_layout

    def _at(self, pos: int) -> int:
        """Entry number at sorted position `pos`."""
        return self._perm[pos] if self._perm is not None else pos

    def _key_at(self, pos: int) -> bytes:
        p = self.path(self._perm[pos] if self._perm is not None else pos)
        return p.replace(b"/", b"\x00") if self._order is Order.WALK else p

    def _key(self, path: bytes) -> bytes:
        return path.replace(b"/", b"\x00") if self._order is Order.WALK else path

    def _lower_bound(self, key: bytes, lo: int = 0, hi: int | None = None) -> int:
        """First sorted position whose key is >= `key` (already transformed)."""
        if hi is None:
            hi = self._n
        key_at = self._key_at
        while lo < hi:
            mid = (lo + hi) // 2
            if key_at(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _file_between(self, path: bytes, lo: int, hi: int) -> bool:
        """Whether a file is stored at `path` at a sorted position in [lo, hi): :meth:`find` for a
        name a listing knows the range of (it sorts before the entries under ``path/``).

        Only keys continuing `path` with a byte below '/' sort between `path` and ``path/``, so
        the name just before `hi` settles it unless it is one of those."""
        if lo < hi:
            before = self.path(self._at(hi - 1))
            if before == path:
                return True
            if not before.startswith(path):
                return False
        key = self._key(path)
        pos = self._lower_bound(key, lo, hi)
        return pos < hi and self._key_at(pos) == key

    def _remember_extent(self, directory: bytes, first: int, end: int) -> None:
        if len(self._extents) >= _EXTENT_CACHE_SIZE:  # the oldest (FIFO; threads: see entry())
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del self._extents[next(iter(self._extents))]
        self._extents[directory] = (first, end)

    def _prefix_end(self, prefix_key: bytes, lo: int, hi: int | None = None) -> int:
        """First sorted position in [`lo`, `hi`) whose key does not start with `prefix_key` (`hi`
        when none; a position known to be past every key starting with it, else the end)."""
        if hi is None:
            hi = self._n
        key_at = self._key_at
        while lo < hi:
            mid = (lo + hi) // 2
            if key_at(mid).startswith(prefix_key):
                lo = mid + 1
            else:
                hi = mid
        return lo

    # -- lookups -------------------------------------------------------------------------------

    def find(self, path: bytes) -> int | None:
        """Entry number of the file stored at `path`, or None. O(log n), no validation."""
        key = self._key(path)
        pos = self._lower_bound(key)
        if pos < self._n and self._key_at(pos) == key:
            return self._at(pos)
        return None

    def _dir_start(self, path: bytes, lo: int = 0) -> int | None:
        """Sorted position of the first entry under directory `path` (b'' = root), or None.

        `lo` may be any position known to sort at or before ``path/`` (e.g. where `path` would be)."""
        if not path:
            return 0
        prefix = self._key(path + b"/")
        pos = self._lower_bound(prefix, lo)
        if pos < self._n and self._key_at(pos).startswith(prefix):
            return pos
        return None

    def _is_dir_after(self, path: bytes, pos: int) -> bool:
        """Whether file `path`, stored at sorted position `pos`, is also a directory prefix.

        Entries under ``path/`` sort after `path`; in walk order they follow it directly, in byte
        order only names continuing `path` with a byte below ``/`` can sit between. So one look at
        the next position settles almost every case; the rest fall back to a binary search."""
        if pos + 1 >= self._n:
            return False
        return self._is_dir_before(path, self.path(self._at(pos + 1)))

    def _is_dir_before(self, path: bytes, next_path: bytes) -> bool:
        """:meth:`_is_dir_after` given the raw path stored at the next sorted position (a listing
        decodes it anyway: it is the next name it looks at)."""
        key = self._key(path)
        nxt = self._key(next_path)
        if not nxt.startswith(key):
            return False
        sep = 0 if self._order is Order.WALK else 0x2F
        if len(nxt) > len(key) and nxt[len(key)] == sep:
            return True
        return self.is_dir(path)

    def is_dir(self, path: bytes) -> bool:
        """True when `path` is an implied directory (the root always is)."""
        return self._dir_start(path) is not None

    def kind(self, path: bytes) -> int | None:
        """Entry number (>= 0) for a file, -1 for a directory, None when nothing is there.

        A path that is both a file and a directory prefix is refused (InvalidArchive)."""
        if not path:
            return -1  # the root
        key = self._key(path)
        pos = self._lower_bound(key)
        number = self._at(pos) if pos < self._n and self._key_at(pos) == key else None
        if number is not None:
            if self._is_dir_after(path, pos):
                raise InvalidArchive(f"entry {number}: path {show(path)} is both a file and a directory")
            return number
        # Not a file. Entries under `path/` sort right where `path` would be (walk order), or after
        # names continuing `path` with a byte below '/' (byte order): one look settles most cases.
        if pos >= self._n:
            return None
        here = self._key_at(pos)
        prefix = self._key(path + b"/")
        if here.startswith(prefix):
            return -1
        if self._order is Order.WALK or not here.startswith(key):
            return None
        return -1 if self._dir_start(path, pos) is not None else None

    def resolve(self, path: bytes) -> int:
        """Like :meth:`kind` but raises NotFound instead of returning None."""
        found = self.kind(path)
        if found is None:
            raise NotFound(f"{show(path)}: no such file or directory in the archive")
        return found

    def children(self, directory: bytes, start_pos: int = 0) -> Iterator[Child]:
        """The names directly inside `directory` (b'' = root), in index order, from `start_pos`.

        `Child.next_pos` is a sorted position and thus a stable resume cookie across calls. Entries
        that break the path rules or collide with a directory of the same name are skipped with a
        warning: they are never served, and the rest of the directory stays listable."""
        for child, _ in self._scan(directory, start_pos, False):
            yield child

    def child_entries(self, directory: bytes, start_pos: int = 0) -> Iterator[Listed]:
        """:meth:`children`, each file with its validated entry (as :meth:`entry` gives it, and
        kept in the same cache) or the InvalidArchive that refuses it; None for a directory.

        For listings that need every file's attributes (readdirplus, a directory's times): each
        stored path is decoded once, and the checks the listing made already (the path rules, the
        file-or-directory conflict) are not made again by the entry's validation; an entry
        validated before (a directory's time pass, then its listing) is not decoded at all."""
        return self._scan(directory, start_pos, True)

    def _scan(self, directory: bytes, start_pos: int, with_entries: bool) -> Iterator[Listed]:
        extent = self._extents.get(directory)
        if extent is not None:
            first, end = extent
            prefix = directory + b"/" if directory else b""
        elif directory:
            start = self._dir_start(directory)
            if start is None:
                if self.find(directory) is not None:
                    raise NotADirectory(f"{show(directory)}: not a directory")
                raise NotFound(f"{show(directory)}: no such directory in the archive")
            first, prefix = start, directory + b"/"
            end = self._prefix_end(self._key(prefix), first)
        else:
            first, prefix, end = 0, b"", self._n
        pos = max(first, start_pos)
        # a resume position is the kernel's offset, which a program may set with seekdir: the first
        # name found there may be the middle of a subdirectory's run, not where it starts
        unsure = pos if pos > first else -1
        plen = len(prefix)
        n, at, path_of, cache = self._n, self._at, self.path, self._entries_cache
        ahead: bytes | None = None  # the path at `pos`, when the step before decoded it
        while pos < end:
            number = at(pos)
            if with_entries:
                known = cache.get(number)
                if known is not None and b"/" not in known.path[plen:]:  # validated, directly here
                    pos += 1
                    ahead = None
                    yield Child(known.path[plen:], number, pos), known
                    continue
            path = ahead if ahead is not None else path_of(number)
            ahead = None
            rest = path[plen:]
            name, sep, _ = rest.partition(b"/")
            if sep:
                sub = prefix + name
                known_sub = self._extents.get(sub)
                if known_sub is not None and known_sub[0] == pos:  # offered before, from here
                    pos = known_sub[1]
                    yield Child(name, -1, pos), None
                    continue
                nxt = self._prefix_end(self._key(sub + b"/"), pos + 1, end)
                problem = name_problem(name)  # deeper faults are found when that directory is listed
                if problem is not None:
                    log.warning("entry %d: %s: %s; skipped", number, show(path), problem)
                elif not self._file_between(sub, first, pos):
                    if pos != unsure:  # its first position (reached from the start or past a name)
                        self._remember_extent(sub, pos, nxt)
                    yield Child(name, -1, nxt), None
                # else a file of the same name sorts just before (and was skipped with a warning):
                # lookup refuses the name (kind()), so the listing must not offer the directory,
                # or the kernel would learn it from readdir and serve what lookup refuses
                pos = nxt
                continue
            pos += 1
            problem = path_problem(path)
            if problem is None and pos < n:
                ahead = path_of(at(pos))
                if self._is_dir_before(path, ahead):
                    problem = "is both a file and a directory"
                if pos >= end:
                    ahead = None
            if problem is not None:
                log.warning("entry %d: %s: %s; skipped", number, show(path), problem)
                continue
            found: Entry | InvalidArchive | None = None
            if with_entries:
                entry = self._entry_fast(number, path)
                if entry is None:
                    try:
                        entry = self._entry_checked(number)
                    except InvalidArchive as exc:
                        found = exc
                if entry is not None:
                    self._remember(number, entry)
                    found = entry
            yield Child(name, number, pos), found

    def data_span(self, directory: bytes) -> tuple[int, int] | None:
        """The data-blob range holding every file under `directory` (b'' = root), or None.

        The data blob follows the stored entry order, and in byte or walk order a directory's
        entries are one contiguous run of it: remote sources prefetch that run for small files
        read one after another. Other orders (and hostile offsets) give None: no prefetch."""
        if self._perm is not None:
            return None
        if directory:
            first = self._dir_start(directory)
            if first is None:
                return None
            end = self._prefix_end(self._key(directory + b"/"), first)
        else:
            first, end = 0, self._n
        if first >= end:
            return None
        try:
            a, b = self.entry(first), self.entry(end - 1)
        except InvalidArchive:
            return None
        lo, hi = a.data_offset, b.data_offset + b.data_size
        return (lo, hi) if lo < hi else None

    # -- entries -------------------------------------------------------------------------------

    def entry(self, i: int) -> Entry:
        """Entry number `i`, fully validated against the format's rules (InvalidArchive if not)."""
        cached = self._entries_cache.get(i)
        if cached is not None:
            return cached
        if not 0 <= i < self._n:
            raise InvalidArchive(f"entry {i}: no such entry (the index has {self._n})")
        entry = self._entry_fast(i)
        if entry is None:  # something is off: the checked reads below say what
            entry = self._entry_checked(i)
        self._remember(i, entry)
        return entry

    def _remember(self, i: int, entry: Entry) -> None:
        if len(self._entries_cache) >= _ENTRY_CACHE_SIZE:
            # the oldest (FIFO). A view is also read on worker threads (generations.changes) while
            # the trio thread reads it: two evictions may pick the same key, or the dict may change
            # between iter and next; a cache needs neither to succeed
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del self._entries_cache[next(iter(self._entries_cache))]
        self._entries_cache[i] = entry

    def _entry_fast(self, i: int, checked_path: bytes | None = None) -> Entry | None:
        """:meth:`_entry_checked` for an entry that breaks no rule, its table read once with every
        bound checked inline (each field through _slot and an error text built per field cost
        ~22 us per entry, most of a cold readdirplus entry's time; bench/results/2026-12-07-
        metadata-profile.md); None as soon as anything is off, for the checked path to name it.
        `checked_path`: the entry's stored path, already read and found to break neither the path
        rules nor the file-or-directory rule by a listing (:meth:`_scan`): not read or checked again."""
        buf, size = self._buf, self._size
        table = self._vec + 4 * i + self._offs[i]
        if table < 0 or table + 4 > size:
            return None
        vt = table - _i32(buf, table)[0]
        layouts = self._layouts
        layout = layouts[vt] if vt in layouts else self._layout_at(vt)
        if layout is None:
            return None
        span, read, path_at, hash_at = layout
        if table + span > size:
            return None
        p, h, offset, data_size, original, mode, uid, gid, mtime, comp = read(buf, table)
        if checked_path is None:
            s = table + path_at + p
            if s + 4 > size or s + 4 + _u32(buf, s)[0] > size:
                return None
            path = buf[s + 4 : s + 4 + _u32(buf, s)[0]]
        else:
            path = checked_path
        hv = table + hash_at + h
        if hv + 4 > size or _u32(buf, hv)[0] != HASH_SIZE_BYTES or hv + 4 + HASH_SIZE_BYTES > size:
            return None
        if (
            comp not in (COMPRESSION_NONE, COMPRESSION_ZSTD)
            or original > MAX_FILE_SIZE_BYTES
            or (comp == COMPRESSION_NONE and data_size != original)
            or (comp == COMPRESSION_ZSTD and data_size == 0 and original != 0)
            or offset + data_size > self.blob_size
            or (
                checked_path is None
                and (
                    path_problem(path) is not None
                    or (self._is_dir_after(path, i) if self._perm is None else self.is_dir(path))
                )
            )
        ):
            return None
        digest = buf[hv + 4 : hv + 4 + HASH_SIZE_BYTES]
        return Entry(i, path, offset, data_size, original, digest, mode, uid, gid, mtime, comp)

    def _layout_at(self, vt: int) -> EntryLayout | None:
        """The entry layout of the vtable at `vt` (format.entry_layout), None when it is out of
        bounds or malformed; kept for the view (the buffer never changes)."""
        buf, size = self._buf, self._size
        layout = None
        if vt >= 0 and vt + 4 <= size:
            vsize = _u16(buf, vt)[0]
            if vsize >= 4 and not vsize % 2 and vt + vsize <= size:
                layout = entry_layout(_u16s(vsize // 2 - 2).unpack_from(buf, vt + 4) if vsize > 4 else ())
        if len(self._layouts) < _LAYOUTS_KEPT:  # a writer shares vtables; an index that does not gets no memory
            self._layouts[vt] = layout
        return layout

    def _entry_checked(self, i: int) -> Entry:
        """Entry `i` read field by field, each check raising the InvalidArchive that names it."""
        path = self.path(i)
        problem = path_problem(path)
        if problem is not None:
            raise InvalidArchive(f"entry {i}: path {show(path)}: {problem}")
        table = self._entry_table(i)
        what = f"entry {i} ({show(path)})"
        hv = self._vector(table, _E_HASH, 1, what, "hash", required=True)
        assert hv is not None
        if hv[1] != HASH_SIZE_BYTES:
            raise InvalidArchive(f"{what}: hash has {hv[1]} bytes, expected {HASH_SIZE_BYTES}")
        digest = self._buf[hv[0] : hv[0] + HASH_SIZE_BYTES]
        offset = self._field_uint(table, _E_OFFSET, 8, 0, what, "data_offset")
        size = self._field_uint(table, _E_SIZE, 8, 0, what, "data_size")
        original = self._field_uint(table, _E_ORIG, 8, 0, what, "original_size")
        mode = self._field_uint(table, _E_MODE, 4, 0, what, "mode")
        uid = self._field_uint(table, _E_UID, 4, 0, what, "uid")
        gid = self._field_uint(table, _E_GID, 4, 0, what, "gid")
        mpos = self._slot(table, _E_MTIME, 8, f"{what}: mtime_ns")
        mtime = _i64(self._buf, mpos)[0] if mpos else 0
        cpos = self._slot(table, _E_COMP, 1, f"{what}: compression")
        comp = _i8(self._buf, cpos)[0] if cpos else COMPRESSION_NONE
        if comp not in (COMPRESSION_NONE, COMPRESSION_ZSTD):
            raise InvalidArchive(f"{what}: unknown compression {comp}")
        if original > MAX_FILE_SIZE_BYTES:
            raise InvalidArchive(f"{what}: original_size {original} exceeds 2^63-1")
        if comp == COMPRESSION_NONE and size != original:
            raise InvalidArchive(f"{what}: uncompressed entry has data_size {size} but original_size {original}")
        if comp == COMPRESSION_ZSTD and size == 0 and original != 0:
            raise InvalidArchive(f"{what}: zstd entry of {original} bytes stores no data")
        if offset + size > self.blob_size:
            raise InvalidArchive(f"{what}: data range {offset}+{size} runs past the {self.blob_size}-byte data blob")
        conflict = self._is_dir_after(path, i) if self._perm is None else self.is_dir(path)
        if conflict:
            raise InvalidArchive(f"{what}: path is both a file and a directory")
        return Entry(i, path, offset, size, original, digest, mode, uid, gid, mtime, comp)

    def entries(self) -> Iterator[Entry]:
        """Every entry in stored order, each validated (stops at the first invalid one)."""
        for i in range(self._n):
            yield self.entry(i)

    def check_all(self) -> None:
        """Validate the whole index now (used by `inspect`, tests and eager policies)."""
        for _ in self.entries():
            pass
