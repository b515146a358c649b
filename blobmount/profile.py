"""Prefetch profiles: which bytes a workload read first, in order, so a later mount can fetch them
before they are asked for (``--record-profile``, ``--prefetch-profile``, ``blobmount profile``).

A profile is a small JSON document (docs/prefetch-profiles.md has the schema)::

    {"schema": "blobmount.prefetch-profile.v1", "created": "2026-12-02T16:00:00Z",
     "index_digest": "sha256:...", "entries": [["lib/a.py", 0, 1532], ["big.bin", 0, 8388608], ...]}

Each entry is ``[path, offset, length]``: a byte range of a file, in the order the range was first
read. Small files are one entry each (they are read whole); large raw files are recorded in
:data:`RANGE_UNIT_BYTES` pieces, merged while a file is read in order, so a sequential read of a
1 GiB file is one entry.

Recording (:class:`Recorder`) costs one set lookup per FUSE read and stops by itself: after
``--record-seconds``, :data:`MAX_ENTRIES` entries or :data:`MAX_PROFILE_BYTES` of JSON.

Using one (:func:`parse` then :func:`plan`): the document is untrusted input, whether it came from
a file or a registry. It is size-capped before it is parsed, its shape is checked, entries naming
paths the archive does not have (or ranges past a file's end) are dropped, and what remains is
turned into data-blob ranges in recorded order. The data blob is in path order, so neighbouring
files' ranges are merged into one request per contiguous run, batch by batch
(:data:`BATCH_BYTES`): early entries are fetched first, and within a batch the fewest requests
carry them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blobmount.errors import InvalidArchive, UsageError
from blobmount.index import COMPRESSION_ZSTD, Entry, IndexView

log = logging.getLogger(__name__)

SCHEMA = "blobmount.prefetch-profile.v1"
MEDIA_TYPE = "application/vnd.blobmount.prefetch-profile.v1+json"  # the layer's and artifact's type
MAX_PROFILE_BYTES = 4 << 20  # a profile larger than this is refused unread (a recorded one stays below)
MAX_ENTRIES = 100_000  # recorded and accepted
MAX_PATH_BYTES = 4096
RANGE_UNIT_BYTES = 1 << 20  # large files are recorded in pieces of this size (the chunk size's default)
SMALL_FILE_BYTES = 1 << 20  # files up to this size are recorded whole (the reader fetches them whole)
DEFAULT_RECORD_SECONDS = 120.0
BATCH_BYTES = 64 << 20  # recorded order is kept between batches of this much data; merged within
ENTRY_OVERHEAD_BYTES = 32  # JSON punctuation and numbers around a path, for the size bound


@dataclass(slots=True)
class Recorder:
    """The order in which files, and pieces of large files, are first read through a mount.
    Fed by the reader on every read (on the trio thread); read by `profile save` and the unmount."""

    seconds: float = DEFAULT_RECORD_SECONDS
    max_entries: int = MAX_ENTRIES
    max_bytes: int = MAX_PROFILE_BYTES // 4  # JSON escapes at most triple it: stays under the accepted size
    clock: Callable[[], float] = time.monotonic
    started: float = -1.0
    entries: list[list[Any]] = field(default_factory=list)  # [path bytes, offset, length]
    stopped: str | None = None  # why recording ended (None: still recording)
    _seen: set[int | tuple[int, int]] = field(default_factory=set)
    _bytes: int = 0

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()

    def read(self, entry: Entry, offset: int, end: int) -> None:
        """A read of [offset, end) of `entry` reached the daemon."""
        if self.stopped is not None or end <= offset:
            return
        if self.clock() - self.started > self.seconds:
            self._stop(f"--record-seconds {self.seconds:g} passed")
            return
        if entry.original_size <= SMALL_FILE_BYTES or entry.compression == COMPRESSION_ZSTD:
            if entry.number not in self._seen:  # read (or decoded) whole by the reader: one entry
                self._seen.add(entry.number)
                self._add(entry, 0, entry.original_size)
            return
        first, last = offset // RANGE_UNIT_BYTES, (end - 1) // RANGE_UNIT_BYTES
        for unit in range(first, last + 1):
            key = (entry.number, unit)
            if key in self._seen:
                continue
            self._seen.add(key)
            start = unit * RANGE_UNIT_BYTES
            length = min(RANGE_UNIT_BYTES, entry.original_size - start)
            tail = self.entries[-1] if self.entries else None
            if tail is not None and tail[0] == entry.path and tail[1] + tail[2] == start:
                tail[2] += length  # the file is read in order: one entry grows
                continue
            self._add(entry, start, length)
            if self.stopped is not None:
                return

    def _add(self, entry: Entry, offset: int, length: int) -> None:
        cost = len(entry.path) + ENTRY_OVERHEAD_BYTES
        if len(self.entries) >= self.max_entries:
            self._stop(f"{self.max_entries} entries recorded")
            return
        if self._bytes + cost > self.max_bytes:
            self._stop(f"{self.max_bytes} bytes recorded")
            return
        self._bytes += cost
        self.entries.append([entry.path, offset, length])

    def _stop(self, why: str) -> None:
        self.stopped = why
        self._seen.clear()
        log.info("prefetch profile: recording stopped (%s); %d entries kept", why, len(self.entries))

    def document(self, index_digest: str, created: str | None = None) -> dict[str, Any]:
        """The profile as a JSON-ready document (the schema in the module docstring)."""
        return {
            "schema": SCHEMA,
            "created": created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "index_digest": index_digest,
            "entries": [[os.fsdecode(p), o, n] for p, o, n in self.entries],
        }


def dumps(doc: dict[str, Any]) -> bytes:
    """Compact JSON; paths that are not UTF-8 travel as surrogate escapes (``\\udcXX``)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()


def write(doc: dict[str, Any], path: os.PathLike[str] | str) -> None:
    """Write atomically (a reader never sees half a profile)."""
    target = os.fspath(path)
    tmp = f"{target}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(dumps(doc))
    os.replace(tmp, target)


def read_file(path: os.PathLike[str] | str) -> bytes:
    """A profile file's bytes, refused unread past MAX_PROFILE_BYTES."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"prefetch profile {os.fspath(path)}: {exc.strerror}") from None
    if len(data) > MAX_PROFILE_BYTES:
        raise InvalidArchive(f"prefetch profile {os.fspath(path)}: larger than {MAX_PROFILE_BYTES} bytes; refused")
    return data


@dataclass(frozen=True, slots=True)
class Profile:
    created: str
    index_digest: str
    entries: list[tuple[bytes, int, int]]  # path, offset, length: checked types, not yet paths


def parse(data: bytes, what: str = "prefetch profile") -> Profile:
    """Check a profile's size and shape (never its paths: :func:`plan` matches them)."""
    if len(data) > MAX_PROFILE_BYTES:
        raise InvalidArchive(f"{what}: {len(data)} bytes, larger than {MAX_PROFILE_BYTES}; refused")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArchive(f"{what}: not JSON ({str(exc)[:100]})") from None
    if not isinstance(doc, dict):
        raise InvalidArchive(f"{what}: not a JSON object")
    if doc.get("schema") != SCHEMA:
        raise InvalidArchive(f"{what}: schema {str(doc.get('schema'))[:80]!r} is not {SCHEMA!r}")
    created, index_digest, raw = doc.get("created"), doc.get("index_digest"), doc.get("entries")
    if not isinstance(created, str) or len(created) > 64:
        raise InvalidArchive(f"{what}: 'created' is not a timestamp")
    if not isinstance(index_digest, str) or len(index_digest) > 128:
        raise InvalidArchive(f"{what}: 'index_digest' is not a digest")
    if not isinstance(raw, list):
        raise InvalidArchive(f"{what}: 'entries' is not a list")
    if len(raw) > MAX_ENTRIES:
        raise InvalidArchive(f"{what}: {len(raw)} entries, more than {MAX_ENTRIES}; refused")
    entries: list[tuple[bytes, int, int]] = []
    for number, item in enumerate(raw):
        ok = isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
        ok = ok and all(type(v) is int and v >= 0 for v in item[1:])
        if not ok:
            raise InvalidArchive(f"{what}: entry {number} is not [path, offset, length]")
        path = os.fsencode(item[0]).strip(b"/")
        if len(path) > MAX_PATH_BYTES:
            raise InvalidArchive(f"{what}: entry {number}: path longer than {MAX_PATH_BYTES} bytes")
        entries.append((path, item[1], item[2]))
    return Profile(created, index_digest, entries)


@dataclass(slots=True)
class Plan:
    """What a profile asks for in this archive: data-blob ranges, batch by batch in recorded order."""

    batches: list[list[tuple[int, int]]]
    used: int  # entries that matched the archive
    ignored: int  # entries naming paths the archive lacks, or ranges past a file's end
    total_bytes: int


def _data_range(entry: Entry, offset: int, length: int) -> tuple[int, int] | None:
    """The data-blob bytes holding [offset, offset+length) of the file, None if outside it."""
    if offset >= max(entry.original_size, 1) or length == 0:
        return None
    if entry.compression == COMPRESSION_ZSTD or entry.original_size <= SMALL_FILE_BYTES:
        return entry.data_offset, entry.data_offset + entry.data_size  # fetched (or decoded) whole
    end = min(offset + length, entry.original_size)
    return entry.data_offset + offset, entry.data_offset + end


def plan(view: IndexView, profile: Profile, budget_bytes: int, batch_bytes: int = BATCH_BYTES) -> Plan:
    """Data-blob ranges for `profile` in this archive, at most `budget_bytes` in all (the cache's
    room): entries in recorded order, cut into batches of `batch_bytes`, each batch merged where
    its ranges touch (the blob is in path order, so a directory read file by file is one run)."""
    batches: list[list[tuple[int, int]]] = []
    batch: list[tuple[int, int]] = []
    in_batch = used = ignored = total = 0
    seen: set[tuple[int, int]] = set()
    for path, offset, length in profile.entries:
        kind = view.kind(path)
        if kind is None or kind < 0:
            ignored += 1
            continue
        try:
            span = _data_range(view.entry(kind), offset, length)
        except InvalidArchive:
            span = None
        if span is None:
            ignored += 1
            continue
        used += 1
        if span in seen or span[0] >= span[1]:
            continue
        seen.add(span)
        size = span[1] - span[0]
        if total + size > budget_bytes:
            break
        total += size
        batch.append(span)
        in_batch += size
        if in_batch >= batch_bytes:
            batches.append(merge(batch))
            batch, in_batch = [], 0
    if batch:
        batches.append(merge(batch))
    return Plan(batches, used, ignored, total)


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


PREFETCH_REQUEST_BYTES = 32 << 20  # one range request of a profile's prefetch: ~0.27 s at 1 Gbit
BUDGET_FRACTION = 0.9  # of the cache's free room a profile may fill (the rest stays for readers)
LOOKUP_TIMEOUTS = 4  # `auto`: the registry look-up may take this many --timeout periods


async def use(
    setting: str,
    archive_name: str,
    view: IndexView,
    data: object,
    options: object,
    budget_bytes: int,
) -> None:
    """--prefetch-profile `setting` (auto or a file), once the mount is ready: find the profile,
    check it, fetch what it names as read-ahead (readers' misses go first). Whatever goes wrong
    is one warning; the mount never depends on it."""
    import trio

    from blobmount.errors import BlobmountError
    from blobmount.registry.options import RegistryOptions
    from blobmount.sources.base import Fetching

    if not isinstance(data, Fetching):
        log.info("prefetch profile: %s is local (or fetched whole); nothing to prefetch", archive_name)
        return
    if data.offline:
        log.info("prefetch profile: --offline; not used")
        return
    try:
        if setting == "auto":
            from blobmount.referrers import newest_profile

            assert isinstance(options, RegistryOptions)
            found = None
            with trio.move_on_after(options.timeout_s * LOOKUP_TIMEOUTS) as scope:
                found = await newest_profile(archive_name, options)
            if scope.cancelled_caught:
                raise InvalidArchive(f"the registry did not list {archive_name}'s referrers in time")
            if found is None:
                log.info("prefetch profile: none published for %s", archive_name)
                return
            referrer, raw = found
            what = f"prefetch profile {referrer.digest} ({referrer.created or 'no date'})"
        else:
            raw = await trio.to_thread.run_sync(read_file, setting)
            what = f"prefetch profile {setting}"
        parsed = await trio.to_thread.run_sync(parse, raw, what)
        chosen = plan(view, parsed, budget_bytes)
        before = data.stats.requests
        fetched = 0
        for batch in chosen.batches:
            fetched += await data.fill(batch, ahead=True, request_bytes=PREFETCH_REQUEST_BYTES)
        log.log(
            logging.WARNING if chosen.ignored else logging.INFO,  # a profile of another archive?
            "%s: %d entries used, %d ignored (not in this archive); %d bytes fetched in %d requests",
            what,
            chosen.used,
            chosen.ignored,
            fetched,
            data.stats.requests - before,
        )
    except BlobmountError as exc:
        log.warning("prefetch profile not used: %s", exc)
