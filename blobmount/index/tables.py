"""The FlatBuffers tables of an index blob, read with every bound checked: root, fields, paths, entries.

The index stays one ``bytes`` object. Nothing per entry is built at open: the entries vector is
copied once into an ``array('I')`` of relative offsets (a memcpy), and every field is read on demand
with precompiled ``struct`` unpackers, each read preceded by an explicit bounds check. The generated
accessors in ``_fb/`` are not used on this path: they check no bounds and cost several Python calls
per field, and lookups here must stay in the tens of microseconds for millions of entries (the
writer uses them, and the tests cross-check this view against them).

The entries are not ordered or searched here (view.py does that); an entry's fields are checked
against the format's rules here, all but the file/directory conflict, which needs the search.
"""

from __future__ import annotations

import struct
import sys
from array import array

from blobmount.errors import InvalidArchive
from blobmount.index.format import (
    _E_COMP,
    _E_GID,
    _E_HASH,
    _E_MODE,
    _E_MTIME,
    _E_OFFSET,
    _E_ORIG,
    _E_PATH,
    _E_SIZE,
    _E_UID,
    _E_UINTS,
    _I_DATA_HASH,
    _I_DATA_SIZE,
    _I_ENTRIES,
    _I_HASHALG,
    _I_VERSION,
    _MTIME_SLOT,
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    HASH_SHA256,
    HASH_SIZE_BYTES,
    MAX_FILE_SIZE_BYTES,
    SUPPORTED_VERSION,
    Entry,
    _i8,
    _i32,
    _i64,
    _u8,
    _u16,
    _u16s,
    _u32,
    _u64,
)
from blobmount.index.paths import path_problem, show


class IndexTables:
    """The bounds-checked reads of one index blob (see the module docstring)."""

    __slots__ = (
        "_buf",
        "_n",
        "_offs",
        "_size",
        "_vec",
        "blob_size",
        "data_hash",
        "data_size",
        "hash_algorithm",
        "version",
    )

    def __init__(self, buf: bytes, *, blob_size: int | None = None) -> None:
        """Parse the root table and copy the entries vector's offsets.

        `blob_size` is the real length of the data blob when the caller knows it; it must then agree
        with the index's ``data_size`` and bounds every entry. Raises InvalidArchive.
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

    def __len__(self) -> int:
        return self._n

    # -- entries -------------------------------------------------------------------------------

    def _entry_fast(self, i: int) -> Entry | None:
        """:meth:`_entry_checked` for an entry whose fields break no rule, its table read once with every
        bound checked inline (each field through _slot and an error text built per field cost
        ~22 us per entry, most of a cold readdirplus entry's time; bench/results/2026-12-07-
        metadata-profile.md); None as soon as anything is off, for the checked path to name it."""
        buf, size = self._buf, self._size
        table = self._vec + 4 * i + self._offs[i]
        if table < 0 or table + 4 > size:
            return None
        vt = table - _i32(buf, table)[0]
        if vt < 0 or vt + 4 > size:
            return None
        vsize = _u16(buf, vt)[0]
        if vsize < 4 or vsize % 2 or vt + vsize > size:
            return None
        slots = _u16s(vsize // 2 - 2).unpack_from(buf, vt + 4) if vsize > 4 else ()
        nslots = len(slots)

        def at(slot: int, width: int) -> int:  # the field's position, 0: absent, -1: out of bounds
            fo = slots[slot] if slot < nslots else 0
            if not fo:
                return 0
            return table + fo if table + fo + width <= size else -1

        p, h = at(_E_PATH, 4), at(_E_HASH, 4)
        if p <= 0 or h <= 0:
            return None
        s = p + _u32(buf, p)[0]
        if s + 4 > size or s + 4 + _u32(buf, s)[0] > size:
            return None
        path = buf[s + 4 : s + 4 + _u32(buf, s)[0]]
        hv = h + _u32(buf, h)[0]
        if hv + 4 > size or _u32(buf, hv)[0] != HASH_SIZE_BYTES or hv + 4 + HASH_SIZE_BYTES > size:
            return None
        values = []
        for slot, width, unpack in _E_UINTS:
            pos = at(slot, width)
            if pos < 0:
                return None
            values.append(unpack(buf, pos)[0] if pos else 0)
        offset, data_size, original, mode, uid, gid = values
        mpos, cpos = at(_E_MTIME, 8), at(_E_COMP, 1)
        if mpos < 0 or cpos < 0:
            return None
        mtime = _i64(buf, mpos)[0] if mpos else 0
        comp = _i8(buf, cpos)[0] if cpos else COMPRESSION_NONE
        if (
            path_problem(path) is not None
            or comp not in (COMPRESSION_NONE, COMPRESSION_ZSTD)
            or original > MAX_FILE_SIZE_BYTES
            or (comp == COMPRESSION_NONE and data_size != original)
            or (comp == COMPRESSION_ZSTD and data_size == 0 and original != 0)
            or offset + data_size > self.blob_size
        ):
            return None
        digest = buf[hv + 4 : hv + 4 + HASH_SIZE_BYTES]
        return Entry(i, path, offset, data_size, original, digest, mode, uid, gid, mtime, comp)

    def _entry_checked(self, i: int) -> Entry:
        """Entry `i` read field by field, each check raising the InvalidArchive that names it (all
        but the file/directory conflict, which needs the search: IndexView.entry checks it)."""
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
        return Entry(i, path, offset, size, original, digest, mode, uid, gid, mtime, comp)

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
