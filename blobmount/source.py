"""Byte sources of the data blob, and opening local archives (a directory, an OCI image layout).

Everything above this module sees a :class:`RangeSource`: ``size`` plus ``read_range(start, end,
hint)``. Local sources also offer ``read_range_sync`` so code already running on a worker thread (the
zstd decoder) reads without hopping back to the event loop. Remote sources (registry/) are wrapped by
the chunk cache (fetch.py), which implements the same protocol; this module never imports them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import trio

from blobmount.errors import InvalidArchive, SourceError, UsageError
from blobmount.manifest import MAX_INDEX_BYTES, MAX_MANIFEST_BYTES, created_ns, descriptor, parse_manifest


@dataclass(slots=True)
class ReadHint:
    """Where a series of reads may go next, so a remote source can fetch ahead: the bytes of one
    open file, or the data of one directory's small files (``directory``). The reader creates one
    per open file or directory; the source keeps its read-ahead state in it. Local sources ignore
    hints (the kernel's page cache does their read-ahead)."""

    lo: int  # the data-blob range the reads stay within
    hi: int
    directory: bool = False
    pos: int = -1  # end of the last read in order
    window: int = 0  # current read-ahead window, bytes
    ahead: int = 0  # how far read-ahead has been requested
    misses: int = 0  # reads that needed the network (directories prefetch from the second on)
    keep: bool = True  # False: chunks fetched for these reads stay in memory, not on disk (the
    # reader keeps the bytes elsewhere: a zstd frame decoded into the content store)


@runtime_checkable
class RangeSource(Protocol):
    """Random access to the data blob. `read_range` returns exactly ``end - start`` bytes or raises
    SourceError; it is never asked for bytes past `size`."""

    @property
    def size(self) -> int: ...

    async def read_range(self, start: int, end: int, hint: ReadHint | None = None) -> bytes: ...

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

    async def read_range(self, start: int, end: int, hint: ReadHint | None = None) -> bytes:
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
    # when the archive was made, dating directories with no file of their own (fs.py): the
    # manifest's created annotation, a local index.blob's mtime; None when neither says
    created_ns: int | None = None


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
    digest = "sha256:" + hashlib.sha256(index).hexdigest()
    return Archive(str(path), index, data, digest, _mtime_ns(path / "index.blob"))


def _mtime_ns(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _oci_blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise InvalidArchive(f"{layout}: unsupported or malformed digest {digest[:80]!r}")
    return layout / "blobs" / "sha256" / hexpart


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
    _media, mdigest, msize = descriptor(chosen, f"oci:{layout}: manifest descriptor")
    if msize > MAX_MANIFEST_BYTES:
        raise InvalidArchive(f"oci:{layout}: manifest of {msize} bytes exceeds {MAX_MANIFEST_BYTES}")
    body = _read_verified(layout, mdigest, msize, "manifest")
    (idigest, isize), (ddigest, dsize) = parse_manifest(body, f"oci:{layout}")
    index = _read_verified(layout, idigest, isize, "index blob")
    data = LocalFileSource(_oci_blob_path(layout, ddigest))
    if data.size != dsize:
        data.close()
        raise InvalidArchive(f"oci:{layout}: data blob has {data.size} bytes, manifest says {dsize}")
    created = created_ns(body)
    if created is None:  # a layout written without the annotation: when its index.json was
        created = _mtime_ns(layout / "index.json")
    return Archive(f"oci:{spec}", index, data, idigest, created)


def write_oci_layout(archive_dir: Path, spec: str, manifest: bytes) -> str:
    """Store an archive as `oci:PATH:TAG` (blobs by digest, the tag in index.json, replacing an
    older manifest of that tag); return the manifest digest. index.json is replaced atomically."""
    path_text, sep, tag = spec.rpartition(":")
    if not sep or not tag or "/" in tag:
        raise UsageError(f"oci:{spec}: name the tag as oci:PATH:TAG")
    layout = Path(path_text)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes | None, src: Path | None) -> str:
        if src is not None:
            hasher = hashlib.sha256()
            with open(src, "rb") as f:
                while block := f.read(1 << 20):
                    hasher.update(block)
            digest = hasher.hexdigest()
            if not (blobs / digest).exists():
                tmp = blobs / f".{digest}.tmp"
                try:
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, blobs / digest)
                except OSError:  # a full disk: no partial blob left behind
                    tmp.unlink(missing_ok=True)
                    raise
        else:
            assert data is not None
            digest = hashlib.sha256(data).hexdigest()
            (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    put(b"{}", None)
    put(None, archive_dir / "index.blob")
    put(None, archive_dir / "data.blob")
    mdigest = put(manifest, None)
    try:
        doc = json.loads((layout / "index.json").read_text())
    except FileNotFoundError:
        doc = {"schemaVersion": 2, "manifests": []}
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArchive(f"{layout}/index.json: unreadable ({exc})") from exc
    keep = [
        m
        for m in doc.get("manifests", [])
        if not (isinstance(m, dict) and m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    ]
    keep.append(
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest,
            "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }
    )
    doc["manifests"] = keep
    tmp = layout / ".index.json.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, layout / "index.json")
    return mdigest


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
