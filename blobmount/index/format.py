"""The index blob's wire layout as this reader sees it (docs/FORMAT.md, "The index blob"): the
supported version and hash, compression kinds, the vtable slots of the index and entry tables with
precompiled ``struct`` unpackers, and the values a view hands out (Entry, Child, Order). No reads."""

from __future__ import annotations

import functools
import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

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
# the unsigned fields of an entry in Entry's order, with their widths: data_offset .. gid
_E_UINTS = (
    (_E_OFFSET, 8, _u64),
    (_E_SIZE, 8, _u64),
    (_E_ORIG, 8, _u64),
    (_E_MODE, 4, _u32),
    (_E_UID, 4, _u32),
    (_E_GID, 4, _u32),
)


@functools.lru_cache(maxsize=64)
def _u16s(count: int) -> struct.Struct:
    """A vtable's field offsets, read at once."""
    return struct.Struct(f"<{count}H")


_MTIME_SLOT = 4 + 2 * _E_MTIME  # its offset within an entry's vtable

# Every field of an entry table in the order entry_layout's reader gives them: (slot, struct code)
_E_FIELDS = (
    (_E_PATH, "I"),  # uoffset of the string
    (_E_HASH, "I"),  # uoffset of the vector
    (_E_OFFSET, "Q"),
    (_E_SIZE, "Q"),
    (_E_ORIG, "Q"),
    (_E_MODE, "I"),
    (_E_UID, "I"),
    (_E_GID, "I"),
    (_E_MTIME, "q"),
    (_E_COMP, "b"),
)
# (span from the table's start, read of every field at once, path field offset, hash field offset)
EntryLayout = tuple[int, Callable[[bytes, int], tuple[int, ...]], int, int]


@functools.lru_cache(maxsize=256)
def entry_layout(slots: tuple[int, ...]) -> EntryLayout | None:
    """How to read every field of an entry table whose vtable holds `slots` (field offsets from
    the table's start, 0: absent) in one ``struct`` call: FlatBuffers shares a vtable between
    tables of one shape, so an index has a handful of layouts, each worked out once (the view
    keeps them by vtable position). The reader returns the fields in :data:`_E_FIELDS`' order,
    0 for an absent one (every default of the format is 0). None: a layout this shortcut does not
    read (path or hash absent, fields overlapping each other or the table's own offset): the
    field-by-field reads decide about it."""
    present = []
    for index, (slot, code) in enumerate(_E_FIELDS):
        fo = slots[slot] if slot < len(slots) else 0
        if fo:
            present.append((fo, struct.calcsize("<" + code), code, index))
        elif slot in (_E_PATH, _E_HASH):
            return None
    present.sort()
    fmt, here, where = "<", 4, [len(present)] * len(_E_FIELDS)  # absent: the appended 0
    for n, (fo, width, code, index) in enumerate(present):
        if fo < here:
            return None
        fmt += f"{fo - here}x{code}" if fo > here else code
        here = fo + width
        where[index] = n
    reader = struct.Struct(fmt).unpack_from
    pick = operator.itemgetter(*where)

    def read(buf: bytes, table: int) -> tuple[int, ...]:
        return pick((*reader(buf, table + 4), 0))  # type: ignore[no-any-return]

    return here, read, slots[_E_PATH], slots[_E_HASH]


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
