"""Read-only view of an index blob: entry order, lookup, directory listing and validated entries.

The FlatBuffers reads are :mod:`.tables`' (bounds-checked, nothing built per entry at open).

Order (docs/FORMAT.md, "Entry order"): at open one linear pass over the paths decides whether the entries
are strictly increasing in byte order, in walk order (the reference writer's component-wise order,
which is byte order with ``/`` ranked below every other byte), or neither. Searches use the order
found; for "neither" a sorted permutation is built once as an ``array('I')`` and duplicate paths are
refused at open. Strictly increasing orders cannot hold duplicates, so after open the only
whole-index property left is file/directory conflicts, which are checked lazily where they matter:
:meth:`IndexView.entry` refuses a file that is also a directory prefix, and listings skip it.

Per-entry rules (path syntax, required fields, hash length, compression, sizes, offsets within the
data blob) are checked by :meth:`IndexView.entry` before an entry is used; nothing unchecked is ever
returned as an :class:`Entry`. Every failure is an :class:`InvalidArchive` with its own message.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from array import array
from collections.abc import Iterator
from typing import NoReturn

from blobmount.errors import InvalidArchive, NotADirectory, NotFound
from blobmount.index.format import Child, Entry, Order, _i32, _u16, _u32, _walk_key
from blobmount.index.paths import name_problem, path_problem, show
from blobmount.index.tables import IndexTables

log = logging.getLogger(__name__)

_ENTRY_CACHE_SIZE = 32768  # validated entries kept (~8 MiB): a tree walk that opens every file of a
# 25k-file tree validated each entry 2-3 times with 4096; bounded so memory never grows with the archive


class IndexView(IndexTables):
    """A validated-on-demand view of one index blob (see the module docstring)."""

    __slots__ = ("_entries_cache", "_order", "_perm")

    def __init__(self, buf: bytes, *, blob_size: int | None = None, known_order: bytes | None = None) -> None:
        """Parse the root table (:class:`IndexTables`) and decide the entry order.

        `known_order` is what :meth:`order_record` returned for these very bytes before (kept by
        digest in the cache), so a remount skips the order scan (0.5 s for a million entries); a
        record that does not fit is ignored. Raises InvalidArchive.
        """
        super().__init__(buf, blob_size=blob_size)
        self._entries_cache: dict[int, Entry] = {}
        self._perm: array[int] | None = None
        order = self._from_record(known_order) if known_order else None
        self._order = order if order is not None else self._scan_order()

    # -- order ---------------------------------------------------------------------------------

    def _scan_order(self) -> Order:
        """Byte order first (what we write: one comparison per entry); walk order only when that
        fails; else a sorted permutation."""
        n = self._n
        if n < 2:
            return Order.BYTES
        if self._in_byte_order():
            return Order.BYTES
        path = self.path
        prev_walk = _walk_key(path(0))
        for i in range(1, n):
            cur_walk = path(i).replace(b"/", b"\x00")
            if not prev_walk < cur_walk:
                break
            prev_walk = cur_walk
        else:
            return Order.WALK
        self._build_permutation()
        return Order.NEITHER

    def _in_byte_order(self) -> bool:
        """Whether the paths strictly increase in byte order. :meth:`path` inlined once more, and the
        path slot looked up once per distinct vtable (writers share one vtable among all entries):
        a million entries scan in ~0.55 s instead of ~0.7 s. Any check that fails is handed to
        :meth:`path`, which raises the same InvalidArchive it always does."""
        buf, size, offs, vec = self._buf, self._size, self._offs, self._vec
        i32, u16, u32 = _i32, _u16, _u32
        prev = self.path(0)
        known_vt, fo = -1, 0
        for i in range(1, self._n):
            table = vec + 4 * i + offs[i]
            if table + 4 > size:
                self._bad_path(i)
            vt = table - i32(buf, table)[0]
            if vt != known_vt:
                if vt < 0 or vt + 6 > size or u16(buf, vt)[0] < 6 or not u16(buf, vt + 4)[0]:
                    self._bad_path(i)
                known_vt, fo = vt, u16(buf, vt + 4)[0]
            field = table + fo
            if field + 4 > size:
                self._bad_path(i)
            start = field + u32(buf, field)[0] + 4
            if start > size:
                self._bad_path(i)
            end = start + u32(buf, start - 4)[0]
            if end > size:
                self._bad_path(i)
            cur = buf[start:end]
            if not prev < cur:
                return False
            prev = cur
        return True

    def _bad_path(self, i: int) -> NoReturn:
        self.path(i)  # raises the InvalidArchive that says what is wrong with entry i
        raise AssertionError(f"entry {i}: the order scan refused a path that path() reads")

    def order_record(self) -> bytes:
        """The outcome of the order scan, to keep by the index's digest (see ``known_order``)."""
        head = self._order.value.encode() + b"\n"
        return head + (self._perm.tobytes() if self._perm is not None else b"")

    def _from_record(self, record: bytes) -> Order | None:
        name, _, rest = record.partition(b"\n")
        try:
            order = Order(name.decode())
        except (UnicodeDecodeError, ValueError):
            return None
        if order is not Order.NEITHER:
            return order if not rest else None
        perm = array("I")
        if len(rest) != 4 * self._n:
            return None
        perm.frombytes(rest)
        if self._n and max(perm) >= self._n:
            return None
        self._perm = perm
        return order

    def _build_permutation(self) -> None:
        paths = [self.path(i) for i in range(self._n)]
        perm = sorted(range(self._n), key=paths.__getitem__)
        for a, b in itertools.pairwise(perm):
            if paths[a] == paths[b]:
                raise InvalidArchive(f"entry {b}: duplicate path {show(paths[b])} (also entry {a})")
        self._perm = array("I", perm)
        log.info("index entries are in neither byte nor walk order; sorted %d entries at open", self._n)

    @property
    def order(self) -> Order:
        return self._order

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

    def _prefix_end(self, prefix_key: bytes, lo: int) -> int:
        """First sorted position >= `lo` whose key does not start with `prefix_key`."""
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
        key = self._key(path)
        nxt = self._key_at(pos + 1)
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
        if directory:
            first = self._dir_start(directory)
            if first is None:
                if self.find(directory) is not None:
                    raise NotADirectory(f"{show(directory)}: not a directory")
                raise NotFound(f"{show(directory)}: no such directory in the archive")
            prefix = directory + b"/"
            end = self._prefix_end(self._key(prefix), first)
        else:
            first, prefix, end = 0, b"", self._n
        pos = max(first, start_pos)
        plen = len(prefix)
        while pos < end:
            number = self._at(pos)
            path = self.path(number)
            rest = path[plen:]
            name, sep, _ = rest.partition(b"/")
            if sep:
                sub_prefix = self._key(prefix + name + b"/")
                nxt = self._prefix_end(sub_prefix, pos + 1)
                problem = name_problem(name)  # deeper faults are found when that directory is listed
                if problem is not None:
                    log.warning("entry %d: %s: %s; skipped", number, show(path), problem)
                elif self.find(prefix + name) is None:
                    yield Child(name, -1, nxt)
                # else a file of the same name sorts just before (and was skipped with a warning):
                # lookup refuses the name (kind()), so the listing must not offer the directory,
                # or the kernel would learn it from readdir and serve what lookup refuses
                pos = nxt
                continue
            pos += 1
            problem = path_problem(path)
            if problem is None and self._is_dir_after(path, pos - 1):
                problem = "is both a file and a directory"
            if problem is not None:
                log.warning("entry %d: %s: %s; skipped", number, show(path), problem)
                continue
            yield Child(name, number, pos)

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
        if self._is_dir_after(entry.path, i) if self._perm is None else self.is_dir(entry.path):
            raise InvalidArchive(f"entry {i} ({show(entry.path)}): path is both a file and a directory")
        if len(self._entries_cache) >= _ENTRY_CACHE_SIZE:
            # the oldest (FIFO). A view is also read on worker threads (generations.changes) while
            # the trio thread reads it: two evictions may pick the same key, or the dict may change
            # between iter and next; a cache needs neither to succeed
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del self._entries_cache[next(iter(self._entries_cache))]
        self._entries_cache[i] = entry
        return entry

    def entries(self) -> Iterator[Entry]:
        """Every entry in stored order, each validated (stops at the first invalid one)."""
        for i in range(self._n):
            yield self.entry(i)

    def check_all(self) -> None:
        """Validate the whole index now (used by `inspect`, tests and eager policies)."""
        for _ in self.entries():
            pass
