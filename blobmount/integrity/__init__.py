"""Integrity of one reader's files: what is verified when, and what a mismatch does (DESIGN §5).

Policy, per file (``--verify``, ``--verify-threshold``):
- *upfront*: a file of at most ``verify_threshold`` bytes, or any file under ``strict``, is verified
  whole before its first byte is served (raw: hashed from the source; zstd: decoded and hashed);
- *lazy* (the default for larger files): a raw file is served as read and hashed as the reads
  arrive (lazy.py); a zstd file is served while it decodes and verified at its end (streaming.py);
- *background*: as lazy, and the rest of an opened raw file is read and hashed at once, so it is
  verified without waiting for the reader.

The one rule for bytes that do not check out (:meth:`Integrity.from_origin`): the file's chunks are
purged and it is read once more, from the origin (never the cache or a mirror): a transient fault
must not poison a file. If it still does not check out it is *poisoned*: every read EIO for the
life of this reader, one log line naming the path and the hashes, its pages dropped.

A mismatch found after bytes were served (lazy, background, a streamed decode) is a *distrust*
(:meth:`Integrity.distrust`): the read that found it fails, and so does every later read through
a handle opened before (its distrust count, the *generation*, is stale: a program that reads a file
to its end never finishes with success and wrong bytes); the kernel's pages are dropped through
`drop_pages` (given at construction: the filesystem's queue, kernel.py); the file is suspect until
it is read whole from the origin by the rule above.

A remote source remembers which large files were verified, with the chunks they were read from
(records.py), so a remount does not hash them again; only a verified file leaves a record.

Concurrency: touched only from the trio thread; hashing reads through the source.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar

import trio

from blobmount.cache import ContentStore
from blobmount.daemon import metrics
from blobmount.decode import FRAME_FAILED
from blobmount.errors import BlobmountError, IntegrityError, InvalidArchive, SourceError
from blobmount.flight import Flights
from blobmount.index import Entry
from blobmount.index.paths import show
from blobmount.integrity import whole
from blobmount.integrity.lazy import LazyHashes
from blobmount.integrity.records import VerifiedRecords
from blobmount.readahead import ReadHint
from blobmount.sources.base import Fetching, RangeSource

if TYPE_CHECKING:
    from blobmount.reader import ReaderConfig

log = logging.getLogger("blobmount.reader")  # the logger the reader's lines always had
_OK = metrics.VERIFY_FILES.labels(result="ok")
_MISMATCH = metrics.VERIFY_FILES.labels(result="mismatch")

RECORD_ABOVE_BYTES = 1 << 20  # files larger than this leave a verified record (smaller: cheap to hash)
EMPTY_SHA256 = hashlib.sha256(b"").digest()

VerifyPolicy = Literal["lazy", "strict", "background"]
T = TypeVar("T")


class Integrity:
    """The verification state and policy of one reader's files (module docstring)."""

    def __init__(
        self,
        source: RangeSource,
        store: ContentStore,
        config: ReaderConfig,
        drop_pages: Callable[[Entry], None] | None = None,
    ) -> None:
        """`drop_pages(entry)`: the kernel may hold pages of `entry` that are not to be trusted
        (a distrust, a poison, a hash state given up); None: no kernel (commands, tests)."""
        self.source = source
        self.store = store  # where a verified decoded file is kept
        self.config = config
        self.remote = source if isinstance(source, Fetching) else None
        self.records = VerifiedRecords(self.remote) if self.remote is not None else None
        self._drop_pages = drop_pages
        self.nursery: trio.Nursery | None = None
        self.verified: set[int] = set()
        self.poisoned: set[int] = set()
        self.suspect: set[int] = set()  # purged and read whole from the origin before served again
        self.generation: dict[int, int] = {}  # entry -> distrusts so far (see distrust)
        self.verifying: Flights[int] = Flights()  # whole-file checks (raw: verify_whole; zstd: streaming.py)
        self.lazy = LazyHashes(self)

    # -- policy ----------------------------------------------------------------------------------

    def upfront(self, entry: Entry) -> bool:
        """Whether this file is verified whole before its first byte is served."""
        return self.config.verify == "strict" or entry.original_size <= self.config.verify_threshold

    def verifies_lazily(self, entry: Entry) -> bool:
        """Whether bytes of this file may be served before all of it was verified (a raw file read
        lazily, a zstd file served while it decodes): its guarantees need per-open state (the
        distrust count of each open, :meth:`check_generation`), so the filesystem keeps real
        opens for an archive that holds such a file (fs.py)."""
        return not self.upfront(entry)

    def lazy_above(self) -> int | None:
        """The size above which files are verified lazily (:meth:`verifies_lazily`); None: none is."""
        return None if self.config.verify == "strict" else self.config.verify_threshold

    # -- state -----------------------------------------------------------------------------------

    def state(self, entry: Entry) -> str:
        """'verified', 'poisoned' or 'unverified' (exposed as the user.blobmount.verified xattr)."""
        if entry.number in self.poisoned:
            return "poisoned"
        return "verified" if entry.number in self.verified else "unverified"

    def check_poison(self, entry: Entry) -> None:
        if entry.number in self.poisoned:
            raise IntegrityError(f"{show(entry.path)}: failed verification earlier; not served")

    def generation_of(self, entry: Entry) -> int:
        return self.generation.get(entry.number, 0)

    def check_generation(self, entry: Entry, generation: int) -> None:
        """A handle opened before the file was distrusted may have been given wrong bytes (or the
        kernel may have, from pages it held): its reads fail from then on, so the program sees
        an error; a new open reads the verified bytes."""
        if generation != self.generation.get(entry.number, 0):
            raise IntegrityError(
                f"{show(entry.path)}: failed verification while this open was reading it; open it again"
            )

    def hashed_ok(self, entry: Entry) -> None:
        self.verified.add(entry.number)
        _OK.inc()

    def drop_pages(self, entry: Entry) -> None:
        if self._drop_pages is not None:
            self._drop_pages(entry)

    def start(self, task: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Run `task` in the reader's long-lived nursery; False: there is none (nothing started)."""
        if self.nursery is None:
            return False
        self.nursery.start_soon(task, *args)
        return True

    # -- verified records --------------------------------------------------------------------------

    async def trusted_before(self, entry: Entry) -> None:
        """At open: a large raw file verified by an earlier mount, over the same chunks, is verified."""
        number = entry.number
        if self.records is None or number in self.verified or number in self.suspect:
            return
        if await self.records.was_verified(entry.data_offset, entry.data_offset + entry.original_size, entry.hash):
            self.verified.add(number)

    async def pieces_agree(self, entry: Entry) -> bool:
        """The bytes served from pieces (random reads) are the ones just hashed (pieces.py)."""
        if self.remote is None:
            return True
        return await self.remote.pieces_agree(entry.data_offset, entry.data_offset + entry.original_size)

    async def _hash_raw(self, entry: Entry) -> None:
        await whole.hash_raw(self.source, entry)
        if not await self.pieces_agree(entry):
            raise IntegrityError(f"{show(entry.path)}: a piece served earlier differs from the bytes verified")

    async def remember(self, entry: Entry) -> None:
        if self.remote is not None:  # the chunks hold the verified bytes now: its pieces go
            await self.remote.drop_pieces(entry.data_offset, entry.data_offset + entry.original_size)
        if self.records is not None and entry.original_size > RECORD_ABOVE_BYTES:
            await self.records.remember(entry.data_offset, entry.data_offset + entry.original_size, entry.hash)

    async def purge(self, entry: Entry) -> None:
        """Before reading a file that did not check out again: drop its chunks, so the next read
        comes from the origin."""
        if self.remote is not None:
            await self.remote.purge(entry.data_offset, entry.data_offset + entry.data_size)

    # -- the one rule: once more from the origin, then poison -------------------------------------

    async def from_origin(
        self, entry: Entry, attempt: Callable[[], Awaitable[T]], *, served: bool = False, what: str = "sha256 mismatch"
    ) -> T:
        """`attempt()` reads the file and checks it (IntegrityError or InvalidArchive: the bytes
        are bad). Bad bytes are read once more, the file's chunks purged first so they come from
        the origin, and a second failure poisons the file; a suspect file is purged before its
        first attempt and poisoned by its first failure. `served`: bytes of it went out before it
        was checked, so a first failure is a distrust (:meth:`distrust`). `what` names a first
        failure in its warning; the hashes are in one line only, the poison's."""
        number = entry.number
        for _ in range(3):
            suspect = number in self.suspect
            if suspect:
                await self.purge(entry)
            try:
                result = await attempt()
            except (IntegrityError, InvalidArchive) as exc:
                if suspect:
                    self.poison(entry, exc)
                _MISMATCH.inc()
                origin = " from the origin" if self.remote is not None else ""
                log.warning("%s: %s; reading it again%s", show(entry.path), what, origin)
                if served:
                    self.distrust(entry)
                else:
                    self.suspect.add(number)  # nothing of it was served
                continue
            if number in self.suspect and not suspect:
                continue  # distrusted while this read the old chunks: once more, purged
            self.suspect.discard(number)
            self.hashed_ok(entry)
            return result
        raise SourceError(f"{show(entry.path)}: distrusted while it was read again; not served")

    def poison(self, entry: Entry, exc: BlobmountError) -> NoReturn:
        """The file failed verification from the origin: EIO for the life of this reader."""
        metrics.VERIFY_FILES.labels(result="poisoned").inc()
        metrics.VERIFY_FAILURES.labels(what="file").inc()
        self.poisoned.add(entry.number)
        self.suspect.discard(entry.number)
        log.error("%s", exc)
        self.drop_pages(entry)
        raise exc

    def distrust(self, entry: Entry) -> None:
        """Bytes of this file served so far may be wrong: fail every handle opened until now
        (:meth:`check_generation`), drop the kernel's pages, start the lazy hash over; the file is
        suspect, read whole from the origin (:meth:`from_origin`) before another byte is served."""
        number = entry.number
        self.generation[number] = self.generation.get(number, 0) + 1
        self.verified.discard(number)
        self.suspect.add(number)
        self.lazy.restart(number)
        self.drop_pages(entry)

    # -- whole raw files ---------------------------------------------------------------------------

    async def verify_whole(self, entry: Entry) -> None:
        """Hash the whole raw file before serving it (upfront, or a suspect file); single-flight per
        entry; bad bytes go through :meth:`from_origin`."""
        number = entry.number
        while self.verifying.busy(number):
            await self.verifying.settle(number)  # a failure there is not ours: we try afresh
            self.check_poison(entry)
            if number in self.verified:
                return
        with self.verifying.lead(number):
            await self.from_origin(entry, lambda: self._hash_raw(entry), served=not self.upfront(entry))
            await self.remember(entry)

    async def load_raw(self, entry: Entry, hint: ReadHint | None) -> bytes:
        """A small raw file read whole in one request and checked (the rule above)."""
        return await self.from_origin(entry, lambda: whole.read_raw(self.source, entry, hint))

    async def decode_in_memory(self, entry: Entry, hint: ReadHint | None, *, prefetch: bool, inline: bool) -> bytes:
        """A zstd file decoded into memory and checked (whole.py; the rule above)."""
        return await self.from_origin(
            entry,
            lambda: whole.decode_in_memory(self.source, entry, hint, prefetch=prefetch, inline=inline),
            what=FRAME_FAILED,
        )

    async def decode_into_store(self, entry: Entry, *, or_hash: bool = False) -> None:
        """A zstd file decoded into the content store and checked (whole.py; the rule above)."""
        await self.from_origin(
            entry, lambda: whole.decode_into_store(self.source, self.store, entry, or_hash=or_hash), what=FRAME_FAILED
        )

    def opened(self, entry: Entry) -> None:
        """A large raw file verified lazily was opened: ``background`` reads and hashes the rest now."""
        number = entry.number
        if self.config.verify == "background" and number not in self.verified and not self.verifying.busy(number):
            self.start(self._detached, entry, "background verification stopped", "it resumes as the file is read")

    def reverify(self, entry: Entry) -> None:
        """A distrusted raw file is read whole from the origin now, in the background, so the next
        open finds it done (else its next read does it)."""
        self.start(self._detached, entry, "reading it again from the origin stopped", "the next read tries again")

    async def _detached(self, entry: Entry, stopped: str, then: str) -> None:
        """:meth:`verify_whole` as a task of its own: a mismatch was logged once by :meth:`poison`
        (the file is EIO from now on); any other failure is one warning, and a later read tries again."""
        try:
            await self.verify_whole(entry)
        except IntegrityError:
            pass
        except BlobmountError as exc:
            log.warning("%s: %s: %s (%s)", show(entry.path), stopped, exc, then)
