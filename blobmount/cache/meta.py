"""Small facts kept in the cache directory: manifests and index blobs by digest, the last digest a
tag resolved to, and which large files were verified with which chunk bytes.

They are tiny next to the data (a manifest is ~1 KiB, an index a few MiB even for a million files),
so they live outside the byte budget and are never evicted; ``blobmount cache prune`` clears them
with everything else only when asked to empty the cache (``--size 0``).

Everything read back is checked before use: blobs against their digest (a mismatch is deleted and
treated as absent), verified records against the chunks' own checksums (verify.py decides). Writes
are atomic (tmp + rename). All methods block briefly on the file system and may run on any thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

from blobmount.cache.space import CacheDir, temp_path

log = logging.getLogger(__name__)

_VERIFIED_MAGIC = b"BMVRFY01"
_VERIFIED_HEAD = struct.Struct("<8sQQQ32s")  # magic, offset, size, chunk size, sha256


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _hex_ok(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True, slots=True)
class TagRecord:
    """A tag's last resolution kept in the cache."""

    digest: str  # sha256:<hex> of the manifest
    resolved_at: float  # seconds since the epoch


class MetaStore:
    """Manifests, index blobs, tag resolutions and verified records of one cache directory."""

    def __init__(self, cache: CacheDir) -> None:
        self.cache = cache
        self.root = cache.root / "meta"

    # -- blobs by digest -----------------------------------------------------------------------

    def get_blob(self, digest_hex: str, size: int | None = None) -> bytes | None:
        """The blob with this sha256, checked; None when absent or damaged (then deleted)."""
        if not _hex_ok(digest_hex):
            return None
        path = self.root / "blobs" / digest_hex
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if (size is not None and len(data) != size) or hashlib.sha256(data).hexdigest() != digest_hex:
            log.warning("cache: %s does not match its digest; discarded", path)
            path.unlink(missing_ok=True)
            return None
        return data

    def put_blob(self, digest_hex: str, data: bytes) -> None:
        """Keep a blob already checked against `digest_hex` by the caller. Best effort."""
        if not _hex_ok(digest_hex):
            return
        try:
            _atomic_write(self.root / "blobs" / digest_hex, data)
        except OSError as exc:
            log.debug("cache: cannot keep blob %s: %s", digest_hex, exc.strerror)

    # -- tags ----------------------------------------------------------------------------------

    @staticmethod
    def _tag_name(reference: str) -> str:
        return hashlib.sha256(reference.encode()).hexdigest()

    def get_tag(self, reference: str) -> TagRecord | None:
        """The digest `reference` (registry/repo:tag) resolved to last time, and when: for
        --offline, and for a mount while the registry does not answer."""
        path = self.root / "tags" / self._tag_name(reference)
        try:
            with open(path, "rb") as f:
                text = f.read(128).decode("ascii", "replace").strip()
                resolved_at = os.fstat(f.fileno()).st_mtime  # put_tag writes a new file every time
        except OSError:
            return None
        if not (text.startswith("sha256:") and _hex_ok(text[7:])):
            return None
        return TagRecord(text, resolved_at)

    def put_tag(self, reference: str, digest: str) -> None:
        try:
            _atomic_write(self.root / "tags" / self._tag_name(reference), digest.encode())
        except OSError as exc:
            log.debug("cache: cannot record tag %s: %s", reference, exc.strerror)

    # -- flags (e.g. "this registry answers ranges for this blob") -----------------------------

    def has_flag(self, name: str) -> bool:
        return (self.root / "flags" / self._tag_name(name)).exists()

    def set_flag(self, name: str) -> None:
        with contextlib.suppress(OSError):
            _atomic_write(self.root / "flags" / self._tag_name(name), name.encode())

    # -- facts derived from a blob (e.g. an index's entry order) -------------------------------

    def get_derived(self, kind: str, digest_hex: str) -> bytes | None:
        """A value computed from the blob `digest_hex` and kept under `kind` (None if absent)."""
        if not _hex_ok(digest_hex):
            return None
        try:
            return (self.root / kind / digest_hex).read_bytes()
        except OSError:
            return None

    def put_derived(self, kind: str, digest_hex: str, value: bytes) -> None:
        if not _hex_ok(digest_hex):
            return
        try:
            _atomic_write(self.root / kind / digest_hex, value)
        except OSError as exc:
            log.debug("cache: cannot keep %s of %s: %s", kind, digest_hex, exc.strerror)

    # -- recorded prefetch profiles --------------------------------------------------------

    def profile_path(self, index_hex: str) -> Path:
        """Where --record-profile keeps a mount's recording: CACHE_DIR/meta/profiles/<index hex>.json
        (a record derived from the index, like the entry order; documented in the README)."""
        return self.root / "profiles" / f"{index_hex}.json"

    def put_profile(self, index_hex: str, document: bytes) -> Path:
        """Keep a recorded profile (temp + rename: a reader never sees half of one). Raises OSError,
        unlike the other derived records: losing a recording the user asked for is worth a warning."""
        if not _hex_ok(index_hex):
            raise OSError(errno.EINVAL, "not a digest")
        path = self.profile_path(index_hex)
        _atomic_write(path, document)
        return path

    # -- verified records ----------------------------------------------------------------------

    def _verified_path(self, blob_hex: str, offset: int, size: int) -> Path:
        return self.root / "verified" / blob_hex / f"{offset}-{size}"

    def get_verified(self, blob_hex: str, offset: int, size: int, sha256: bytes, chunk_size: int) -> array[int] | None:
        """The chunk checksums a file's bytes had when they were verified, or None."""
        try:
            raw = self._verified_path(blob_hex, offset, size).read_bytes()
            magic, r_off, r_size, r_cs, r_sha = _VERIFIED_HEAD.unpack_from(raw)
        except (OSError, struct.error):
            return None
        if (magic, r_off, r_size, r_cs, r_sha) != (_VERIFIED_MAGIC, offset, size, chunk_size, sha256):
            return None
        digests = array("Q")
        body = raw[_VERIFIED_HEAD.size :]
        if len(body) % digests.itemsize:
            return None
        digests.frombytes(body)
        return digests

    def put_verified(
        self, blob_hex: str, offset: int, size: int, sha256: bytes, chunk_size: int, digests: array[int]
    ) -> None:
        head = _VERIFIED_HEAD.pack(_VERIFIED_MAGIC, offset, size, chunk_size, sha256)
        try:
            _atomic_write(self._verified_path(blob_hex, offset, size), head + digests.tobytes())
        except OSError as exc:
            log.debug("cache: cannot record verification: %s", exc.strerror)
