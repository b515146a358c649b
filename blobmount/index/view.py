"""Read-only view of an index blob: bounds-checked field access, lookup and directory listing.

The index stays one ``bytes`` object. Nothing per entry is built at open: the entries vector is
copied once into an ``array('I')`` of relative offsets (a memcpy), and every field is read on demand
with precompiled ``struct`` unpackers, each read preceded by an explicit bounds check. The generated
accessors in ``_fb/`` are not used on this path: they check no bounds and cost several Python calls
per field, and lookups here must stay in the tens of microseconds for millions of entries (the
writer uses them, and the tests cross-check this view against them).

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

import itertools
import logging
import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn

from blobmount.errors import InvalidArchive, NotADirectory, NotFound
from blobmount.index.paths import name_problem, path_problem, show

log = logging.getLogger(__name__)

SUPPORTED_VERSION = 1
HASH_SHA256 = 0
HASH_SIZE_BYTES = 32
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
MAX_FILE_SIZE_BYTES = (1 << 63) - 1  # st_size is a signed 64-bit value
_ENTRY_CACHE_SIZE = 32768  # validated entries kept (~8 MiB): a tree walk that opens every file of a
# 25k-file tree validated each entry 2-3 times with 4096; bounded so memory never grows with the archive

_u8 = struct.Struct("<B").unpack_from
_i8 = struct.Struct("<b").unpack_from
_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from
_u64 = struct.Struct("<Q").unpack_from
_i64 = struct.Struct("<q").unpack_from

# Entry vtable slots (docs/FORMAT.md, "The index blob")
_E_PATH, _E_OFFSET, _E_SIZE, _E_ORIG, _E_HASH, _E_MODE, _E_UID, _E_GID, _E_MTIME, _E_COMP = range(10)
_MTIME_SLOT = 4 + 2 * _E_MTIME  # its offset within an entry's vtable
_E_SLOTS = 10
# an entry vtable's field offsets, by how many of them the vtable holds (a shorter one: the rest absent)
_FAST_FIELDS = (  # (slot, width, unpack) of the numeric fields, in Entry's order
    (_E_OFFSET, 8, _u64),
    (_E_SIZE, 8, _u64),
    (_E_ORIG, 8, _u64),
    (_E_MODE, 4, _u32),
    (_E_UID, 4, _u32),
    (_E_GID, 4, _u32),
    (_E_MTIME, 8, _i64),
    (_E_COMP, 1, _i8),
)
_SLOT_OFFSETS = [struct.Struct(f"<{n}H").unpack_from for n in range(_E_SLOTS + 1)]
# Index vtable slots
_I_VERSION, _I_HASHALG, _I_ENTRIES, _I_DATA_SIZE, _I_DATA_HASH = range(5)


class Order(Enum):
    """How the stored entries are ordered; decides how lookups search."""

    BYTES = "bytes"  # strictly increasing raw path bytes (what we write)
    WALK = "walk"  # strictly increasing component-wise (the reference writer's walk)
    NEITHER = "neither"  # searched through a sorted permutation built at open


@dataclass(frozen=True, slots=True)
class Entry:
    """One validated index entry; built on demand, never stored per entry."""

    number: int  # position in the stored entries vector
    path: bytes
    data_offset: int
    data_size: int
    original_size: int
    hash: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    compression: int

    @property
    def name(self) -> bytes:
        return self.path.rpartition(b"/")[2]


@dataclass(frozen=True, slots=True)
class Child:
    """One name in a directory listing. `entry` is the entry number of a file, -1 for a directory;
    `next_pos` is the sorted position where the listing resumes after this child (a stable cookie)."""

    name: bytes
    entry: int
    next_pos: int

    @property
    def is_dir(self) -> bool:
        return self.entry < 0


def _walk_key(path: bytes) -> bytes:
    return path.replace(b"/", b"\x00")


class IndexView:
    """A validated-on-demand view of one index blob (see the module docstring)."""

    __slots__ = (
        "_buf",
        "_entries_cache",
        "_n",
        "_offs",
        "_order",
        "_perm",
        "_size",
        "_vec",
        "blob_size",
        "data_hash",
        "data_size",
        "hash_algorithm",
        "version",
    )

    def __init__(self, buf: bytes, *, blob_size: int | None = None, known_order: bytes | None = None) -> None:
        """Parse the root table and decide the entry order.

        `blob_size` is the real length of the data blob when the caller knows it; it must then agree
        with the index's ``data_size`` and bounds every entry. `known_order` is what
        :meth:`order_record` returned for these very bytes before (kept by digest in the cache), so a
        remount skips the order scan (0.5 s for a million entries); a record that does not fit is
        ignored. Raises InvalidArchive.
        """
        self._buf = bytes(buf)
        self._size = len(self._buf)
        self._entries_cache: dict[int, Entry] = {}
        root = self._root()
        self.version = self._field_uint(root, _I_VERSION, 4, SUPPORTED_VERSION, "index", "version")
        if self.version != SUPPORTED_VERSION:
            raise InvalidArchive(f"index: unsupported version {self.version} (this reader knows 1)")
        self.hash_algorithm = self._field_uint(root, _I_HASHALG, 1, HASH_SHA256, "index", "hash_algorithm")
        if self.hash_algorithm != HASH_SHA256:
            raise InvalidArchive(f"index: unsupported hash_algorithm {self.hash_algorithm} (only SHA256=0)")
        self.data_size = self._field_uint(root, _I_DATA_SIZE, 8, 0, "index", "data_size")
        dh = self._vector(root, _I_DATA_HASH, 1, "index", "data_hash", required=False)
        self.data_hash: bytes | None = None
        if dh is not None:
            start, count = dh
            if count != HASH_SIZE_BYTES:
                raise InvalidArchive(f"index: data_hash has {count} bytes, expected {HASH_SIZE_BYTES}")
            self.data_hash = self._buf[start : start + count]
        if blob_size is not None:
            if self.data_hash is not None and self.data_size != blob_size:
                raise InvalidArchive(
                    f"index: data_size {self.data_size} does not match the data blob's {blob_size} bytes"
                )
            self.blob_size = blob_size
        else:
            self.blob_size = self.data_size
        vec = self._vector(root, _I_ENTRIES, 4, "index", "entries", required=True)
        assert vec is not None  # required=True never returns None
        self._vec, self._n = vec
        offs = array("I")
        offs.frombytes(self._buf[self._vec : self._vec + 4 * self._n])
        if sys.byteorder != "little":
            offs.byteswap()
        self._offs = offs
        self._perm: array[int] | None = None
        order = self._from_record(known_order) if known_order else None
        self._order = order if order is not None else self._scan_order()

    # -- raw, bounds-checked reads -------------------------------------------------------------

    def _need(self, pos: int, length: int, what: str) -> None:
        if pos < 0 or length < 0 or pos + length > self._size:
            raise InvalidArchive(f"{what}: bytes {pos}..{pos + length} lie outside the {self._size}-byte index")

    def _root(self) -> int:
        self._need(0, 4, "index: root offset")
        root: int = _u32(self._buf, 0)[0]
        self._table(root, "index: root table")
        return root

    def _table(self, pos: int, what: str) -> int:
        """Check the table at `pos` and its vtable; return the vtable position."""
        self._need(pos, 4, what)
        vt: int = pos - _i32(self._buf, pos)[0]
        self._need(vt, 4, f"{what} vtable")
        vsize, _tsize = struct.unpack_from("<HH", self._buf, vt)
        if vsize < 4 or vsize % 2:
            raise InvalidArchive(f"{what}: vtable size {vsize} is malformed")
        self._need(vt, vsize, f"{what} vtable")
        return vt

    def _slot(self, table: int, slot: int, width: int, what: str) -> int:
        """Absolute position of field `slot` of `table`, or 0 when absent; the field's `width` bytes
        are checked to lie inside the buffer."""
        vt = table - _i32(self._buf, table)[0]
        vsize = _u16(self._buf, vt)[0]
        entry = 4 + 2 * slot
        if entry + 2 > vsize:
            return 0
        fo: int = _u16(self._buf, vt + entry)[0]
        if fo == 0:
            return 0
        self._need(table + fo, width, what)
        return table + fo

    def _field_uint(self, table: int, slot: int, width: int, default: int, owner: str, name: str) -> int:
        pos = self._slot(table, slot, width, f"{owner}: {name}")
        if not pos:
            return default
        unpack = {1: _u8, 4: _u32, 8: _u64}[width]
        value: int = unpack(self._buf, pos)[0]
        return value

    def _vector(
        self, table: int, slot: int, elem: int, owner: str, name: str, *, required: bool
    ) -> tuple[int, int] | None:
        """(start of elements, count) of a vector field, bounds-checked."""
        pos = self._slot(table, slot, 4, f"{owner}: {name}")
        if not pos:
            if required:
                raise InvalidArchive(f"{owner}: required field '{name}' is missing")
            return None
        vec = pos + _u32(self._buf, pos)[0]
        self._need(vec, 4, f"{owner}: {name}")
        count: int = _u32(self._buf, vec)[0]
        self._need(vec + 4, count * elem, f"{owner}: {name} ({count} elements)")
        return vec + 4, count

    def _entry_table(self, i: int) -> int:
        pos = self._vec + 4 * i
        table = pos + self._offs[i]
        self._table(table, f"entry {i}")
        return table

    def path(self, i: int) -> bytes:
        """Raw stored path of entry `i` (bounds-checked, not yet checked against the path rules)."""
        buf = self._buf
        table = self._vec + 4 * i + self._offs[i]
        # Inline of _table/_slot/_vector for the hot path (lookups, listings, the order scan).
        if table + 4 > self._size:
            raise InvalidArchive(f"entry {i}: table at {table} lies outside the {self._size}-byte index")
        vt = table - _i32(buf, table)[0]
        if vt < 0 or vt + 6 > self._size:
            raise InvalidArchive(f"entry {i}: vtable at {vt} lies outside the {self._size}-byte index")
        vsize = _u16(buf, vt)[0]
        fo = _u16(buf, vt + 4)[0] if vsize >= 6 else 0
        if fo == 0:
            raise InvalidArchive(f"entry {i}: required field 'path' is missing")
        field = table + fo
        if field + 4 > self._size:
            raise InvalidArchive(f"entry {i}: path offset lies outside the {self._size}-byte index")
        s = field + _u32(buf, field)[0]
        if s + 4 > self._size:
            raise InvalidArchive(f"entry {i}: path string lies outside the {self._size}-byte index")
        end = s + 4 + _u32(buf, s)[0]
        if end > self._size:
            raise InvalidArchive(f"entry {i}: path of {end - s - 4} bytes runs past the index end")
        return buf[s + 4 : end]

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

    def __len__(self) -> int:
        return self._n

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
        path = self.path(i)
        problem = path_problem(path)
        if problem is not None:
            raise InvalidArchive(f"entry {i}: path {show(path)}: {problem}")
        entry = self._entry_fast(i, path)
        if entry is None:
            entry = self._entry_checked(i, path)  # raises InvalidArchive, saying what is wrong
        if len(self._entries_cache) >= _ENTRY_CACHE_SIZE:
            del self._entries_cache[next(iter(self._entries_cache))]  # the oldest (FIFO)
        self._entries_cache[i] = entry
        return entry

    def _entry_fast(self, i: int, path: bytes) -> Entry | None:
        """Entry `i` when every rule holds, else None (then :meth:`_entry_checked` names the broken
        rule). The same checks as that method, without building a message per field: validating
        a whole 25,000-entry index (`cp` of an archive, `check_all`) took 11 us an entry, most of
        it in messages never shown."""
        buf, size = self._buf, self._size
        table = self._vec + 4 * i + self._offs[i]  # path(i) checked the table's first 4 bytes
        vt = table - _i32(buf, table)[0]
        if vt < 0 or vt + 4 > size:
            return None
        vsize = _u16(buf, vt)[0]
        if vsize < 4 or vsize % 2 or vt + vsize > size:
            return None
        n = min(_E_SLOTS, (vsize - 4) // 2)
        fo = _SLOT_OFFSETS[n](buf, vt + 4) + (0,) * (_E_SLOTS - n)
        if not fo[_E_HASH]:
            return None
        hp = table + fo[_E_HASH]
        if hp + 4 > size:
            return None
        hv = hp + _u32(buf, hp)[0]
        if hv + 4 > size or _u32(buf, hv)[0] != HASH_SIZE_BYTES or hv + 4 + HASH_SIZE_BYTES > size:
            return None
        digest = buf[hv + 4 : hv + 4 + HASH_SIZE_BYTES]
        values = []
        for slot, width, unpack in _FAST_FIELDS:
            off = fo[slot]
            if not off:
                values.append(0)
                continue
            pos = table + off
            if pos + width > size:
                return None
            values.append(unpack(buf, pos)[0])
        offset, dsize, original, mode, uid, gid, mtime, comp = values
        if not fo[_E_COMP]:
            comp = COMPRESSION_NONE
        if comp not in (COMPRESSION_NONE, COMPRESSION_ZSTD) or original > MAX_FILE_SIZE_BYTES:
            return None
        if comp == COMPRESSION_NONE and dsize != original:
            return None
        if comp == COMPRESSION_ZSTD and dsize == 0 and original != 0:
            return None
        if offset + dsize > self.blob_size:
            return None
        if self._is_dir_after(path, i) if self._perm is None else self.is_dir(path):
            return None
        return Entry(i, path, offset, dsize, original, digest, mode, uid, gid, mtime, comp)

    def _entry_checked(self, i: int, path: bytes) -> Entry:
        """Entry `i` validated field by field, each failure with its own message."""
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

    def mtime_ns(self, i: int) -> int:
        """Entry `i`'s stored mtime alone (0 when absent), bounds-checked like every read.

        For directory times (fs.py): the newest mtime of a directory's files is computed over all
        of them at its first stat, and :meth:`entry`'s full validation costs ~35 us per entry
        against ~1 us for this read (a 100,000-file directory: 3.8 s instead of 0.4 s). The
        listing that yields `i` has already checked its path; an entry refused for another field
        still lends the directory its time, which is only a timestamp, never data. The table and
        vtable reads are inlined as in :meth:`path`; anything out of bounds goes the checked way,
        which raises the InvalidArchive that says what is wrong."""
        buf, size = self._buf, self._size
        table = self._vec + 4 * i + self._offs[i]
        if table + 4 <= size:
            vt = table - _i32(buf, table)[0]
            if vt >= 0 and vt + 4 <= size:
                vsize = _u16(buf, vt)[0]
                if vsize >= 4 and not vsize % 2 and vt + vsize <= size:
                    fo = _u16(buf, vt + _MTIME_SLOT)[0] if vsize >= _MTIME_SLOT + 2 else 0
                    if not fo:
                        return 0
                    if table + fo + 8 <= size:
                        value: int = _i64(buf, table + fo)[0]
                        return value
        table = self._entry_table(i)
        pos = self._slot(table, _E_MTIME, 8, f"entry {i}: mtime_ns")
        raise AssertionError(f"entry {i}: mtime at {pos} refused by the inlined read only")

    def entries(self) -> Iterator[Entry]:
        """Every entry in stored order, each validated (stops at the first invalid one)."""
        for i in range(self._n):
            yield self.entry(i)

    def check_all(self) -> None:
        """Validate the whole index now (used by `inspect`, tests and eager policies)."""
        for _ in self.entries():
            pass
