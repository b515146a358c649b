"""The FlatBuffers tables of an index blob read with every bound checked, and the entries' order.

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

What is not here (view.py): searching by path, listings, and the validated :class:`Entry` (its
per-entry rules include the file/directory conflict, which needs the search).
"""

from __future__ import annotations

import itertools
import logging
import struct
import sys
from array import array
from typing import NoReturn

from blobmount.errors import InvalidArchive
from blobmount.index.format import (
    _E_MTIME,
    _E_ORIG,
    _I_DATA_HASH,
    _I_DATA_SIZE,
    _I_ENTRIES,
    _I_HASHALG,
    _I_VERSION,
    _MTIME_SLOT,
    HASH_SHA256,
    HASH_SIZE_BYTES,
    SUPPORTED_VERSION,
    Order,
    _i32,
    _i64,
    _u8,
    _u16,
    _u32,
    _u64,
    _walk_key,
)
from blobmount.index.paths import show

log = logging.getLogger(__name__)


class IndexTables:
    """The bounds-checked reads of one index blob and its entries' order (module docstring)."""

    __slots__ = (
        "_buf",
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
        """Parse the root table, copy the entries vector's offsets and decide the entry order.

        `blob_size` is the real length of the data blob when the caller knows it; it must then agree
        with the index's ``data_size`` and bounds every entry. `known_order` is what
        :meth:`order_record` returned for these very bytes before (kept by digest in the cache), so a
        remount skips the order scan (0.5 s for a million entries); a record that does not fit is
        ignored. Raises InvalidArchive.
        """
        self._buf = bytes(buf)
        self._size = len(self._buf)
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

    def original_size(self, i: int) -> int:
        """Entry `i`'s stored original_size alone (0 when absent), bounds-checked, nothing cached:
        fs.py's pass over every entry at mount time (is any file verified lazily?) costs ~2 us per
        entry this way instead of :meth:`entry`'s ~35 us, and leaves the entry cache to the reads."""
        return self._field_uint(self._entry_table(i), _E_ORIG, 8, 0, f"entry {i}", "original_size")

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
