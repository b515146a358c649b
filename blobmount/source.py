"""Byte sources of the data blob, and opening local archives (a directory, an OCI image layout).

Everything above this module sees a :class:`RangeSource`: ``size`` plus ``read_range(start, end)``.
Local sources also offer ``read_range_sync`` so code already running on a worker thread (the zstd
decoder) reads without hopping back to the event loop. Remote sources (registry/) implement the same
protocol and are wrapped by the chunk cache; this module never imports them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import trio

from blobmount.errors import InvalidArchive, SourceError, UsageError

INDEX_MEDIA_TYPE = "application/vnd.meigma.blob.index.v1+flatbuffers"
DATA_MEDIA_TYPE = "application/vnd.meigma.blob.data.v1"
ARTIFACT_TYPE = "application/vnd.meigma.blob.v1"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
MAX_INDEX_BYTES = 1 << 30  # ~10M entries of ~100 bytes; far above the reference's 8 MiB refusal
MAX_MANIFEST_BYTES = 4 << 20  # the distribution spec's suggested manifest limit


@runtime_checkable
class RangeSource(Protocol):
    """Random access to the data blob. `read_range` returns exactly ``end - start`` bytes or raises
    SourceError; it is never asked for bytes past `size`."""

    @property
    def size(self) -> int: ...

    async def read_range(self, start: int, end: int) -> bytes: ...

    def close(self) -> None: ...

    async def aclose(self) -> None:
        """Release what needs the event loop (network clients); `close` does the rest."""


@runtime_checkable
class SyncRangeSource(RangeSource, Protocol):
    """A source cheap enough to read from a worker thread directly (a local file)."""

    def read_range_sync(self, start: int, end: int) -> bytes: ...


class LocalFileSource:
    """The data blob as a local file, read with pread (no caching: the page cache already does)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"{path}: cannot open data blob: {exc.strerror}") from exc
        self._size = os.fstat(self._fd).st_size
        self.verified_digest = False  # a local file is not tied to a verified digest (DESIGN §5)

    @property
    def size(self) -> int:
        return self._size

    def read_range_sync(self, start: int, end: int) -> bytes:
        if not 0 <= start <= end <= self._size:
            raise SourceError(f"{self.path}: range {start}..{end} outside the {self._size}-byte blob")
        parts = []
        pos = start
        while pos < end:
            try:
                got = os.pread(self._fd, end - pos, pos)
            except OSError as exc:
                raise SourceError(f"{self.path}: read at {pos}: {exc.strerror}") from exc
            if not got:
                raise SourceError(f"{self.path}: data blob shrank to {pos} bytes while mounted")
            parts.append(got)
            pos += len(got)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_range(self, start: int, end: int) -> bytes:
        if end - start <= _INLINE_READ_BYTES:
            # Measured (bench/fs_local.py): a trio.to_thread hop per FUSE read halved cold sequential
            # throughput against squashfuse (0.45x), while an inline pread of up to 1 MiB (the
            # kernel's largest FUSE read) reached 0.94x. The cost: a local disk that stalls stalls
            # the event loop too, as it would stall any reader of the data blob.
            return self.read_range_sync(start, end)
        return await trio.to_thread.run_sync(self.read_range_sync, start, end)

    def close(self) -> None:
        os.close(self._fd)

    async def aclose(self) -> None:
        """Nothing needs the event loop here; the fd is closed by :meth:`close`."""


_INLINE_READ_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Archive:
    """An opened archive: the index bytes (already checked against their digest where one is
    known) and the data blob's source."""

    name: str
    index_bytes: bytes
    data: RangeSource
    index_digest: str  # "sha256:<hex>"


LocalArchive = Archive


def _read_file(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise InvalidArchive(f"{path}: {what} of {size} bytes exceeds the {limit}-byte limit")
            return f.read(limit + 1)
    except FileNotFoundError as exc:
        raise SourceError(f"{path}: no such file") from exc
    except OSError as exc:
        raise SourceError(f"{path}: cannot read {what}: {exc.strerror}") from exc


def open_directory(path: Path) -> Archive:
    """A directory holding index.blob + data.blob."""
    if not path.is_dir():
        raise SourceError(f"{path}: not a directory holding index.blob and data.blob")
    index = _read_file(path / "index.blob", MAX_INDEX_BYTES, "index blob")
    data = LocalFileSource(path / "data.blob")
    return Archive(str(path), index, data, "sha256:" + hashlib.sha256(index).hexdigest())


def _oci_blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise InvalidArchive(f"{layout}: unsupported or malformed digest {digest[:80]!r}")
    return layout / "blobs" / "sha256" / hexpart


def _descriptor(obj: object, what: str) -> tuple[str, str, int]:
    if not isinstance(obj, dict):
        raise InvalidArchive(f"{what}: descriptor is not an object")
    media, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media, str) or not isinstance(digest, str) or not isinstance(size, int) or size < 0:
        raise InvalidArchive(f"{what}: descriptor lacks mediaType, digest or a valid size")
    return media, digest, size


def parse_manifest(body: bytes, what: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """Check a blob-archive manifest (FORMAT.md); return ((index digest, size), (data digest, size))."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArchive(f"{what}: manifest is not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise InvalidArchive(f"{what}: manifest is not a JSON object")
    media = doc.get("mediaType")
    if media == "application/vnd.oci.image.index.v1+json" or "manifests" in doc:
        raise InvalidArchive(f"{what}: names an image index, not a blob archive")
    if media != MANIFEST_MEDIA_TYPE or doc.get("schemaVersion") != 2:
        raise InvalidArchive(f"{what}: not an OCI image manifest (mediaType {str(media)[:80]!r})")
    if doc.get("artifactType") != ARTIFACT_TYPE:
        raise InvalidArchive(
            f"{what}: artifactType {str(doc.get('artifactType'))[:80]!r} is not {ARTIFACT_TYPE!r}"
            " (a container image or another artifact)"
        )
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 2:
        count = len(layers) if isinstance(layers, list) else "no"
        raise InvalidArchive(f"{what}: expected exactly 2 layers (index, data), found {count}")
    index_media, index_digest, index_size = _descriptor(layers[0], f"{what}: layer 0")
    data_media, data_digest, data_size = _descriptor(layers[1], f"{what}: layer 1")
    if index_media != INDEX_MEDIA_TYPE:
        raise InvalidArchive(f"{what}: layer 0 has media type {index_media[:80]!r}, not {INDEX_MEDIA_TYPE!r}")
    if data_media != DATA_MEDIA_TYPE:
        raise InvalidArchive(f"{what}: layer 1 has media type {data_media[:80]!r}, not {DATA_MEDIA_TYPE!r}")
    if index_size > MAX_INDEX_BYTES:
        raise InvalidArchive(f"{what}: index blob of {index_size} bytes exceeds {MAX_INDEX_BYTES}")
    return (index_digest, index_size), (data_digest, data_size)


def open_oci_layout(spec: str) -> Archive:
    """`PATH[:TAG]` of an OCI image layout directory (the skopeo/oras naming)."""
    path_text, tag = spec, None
    if not Path(spec).is_dir() and ":" in spec:
        path_text, _, tag = spec.rpartition(":")
    layout = Path(path_text)
    index_doc_bytes = _read_file(layout / "index.json", MAX_MANIFEST_BYTES, "OCI layout index.json")
    try:
        index_doc = json.loads(index_doc_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArchive(f"{layout}/index.json: not JSON ({exc})") from exc
    manifests = index_doc.get("manifests") if isinstance(index_doc, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise InvalidArchive(f"{layout}/index.json: no manifests")
    chosen = None
    if tag is None:
        if len(manifests) != 1:
            raise UsageError(f"oci:{layout}: holds {len(manifests)} manifests; name one as oci:PATH:TAG")
        chosen = manifests[0]
    else:
        for m in manifests:
            ann = m.get("annotations") if isinstance(m, dict) else None
            if isinstance(ann, dict) and ann.get("org.opencontainers.image.ref.name") == tag:
                chosen = m
                break
        if chosen is None:
            raise SourceError(f"oci:{layout}: no manifest tagged {tag!r}")
    _media, mdigest, msize = _descriptor(chosen, f"oci:{layout}: manifest descriptor")
    if msize > MAX_MANIFEST_BYTES:
        raise InvalidArchive(f"oci:{layout}: manifest of {msize} bytes exceeds {MAX_MANIFEST_BYTES}")
    body = _read_verified(layout, mdigest, msize, "manifest")
    (idigest, isize), (ddigest, dsize) = parse_manifest(body, f"oci:{layout}")
    index = _read_verified(layout, idigest, isize, "index blob")
    data = LocalFileSource(_oci_blob_path(layout, ddigest))
    if data.size != dsize:
        data.close()
        raise InvalidArchive(f"oci:{layout}: data blob has {data.size} bytes, manifest says {dsize}")
    return Archive(f"oci:{spec}", index, data, idigest)


def _read_verified(layout: Path, digest: str, size: int, what: str) -> bytes:
    body = _read_file(_oci_blob_path(layout, digest), max(size, 0), what)
    actual = "sha256:" + hashlib.sha256(body).hexdigest()
    if len(body) != size or actual != digest:
        raise InvalidArchive(
            f"oci:{layout}: {what} does not match its descriptor (expected {digest}, {size} bytes;"
            f" got {actual}, {len(body)} bytes)"
        )
    return body


def open_local(spec: str) -> Archive:
    """Open a local SOURCE (DESIGN §8): `oci:PATH[:TAG]`, `dir:PATH`, or a path starting with `/`,
    `./` or `../`. Anything else is a registry reference, which this function refuses."""
    if spec.startswith("oci:"):
        return open_oci_layout(spec[4:])
    if spec.startswith("dir:"):
        return open_directory(Path(spec[4:]))
    if is_local_path(spec):
        return open_directory(Path(spec))
    raise UsageError(
        f"{spec!r} is a registry reference; this build reads local archives only"
        " (write a local directory as /path, ./path or dir:path, an OCI layout as oci:path[:tag])"
    )


def is_local_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../")) or spec in (".", "..")
