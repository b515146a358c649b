"""The blob-archive manifest (docs/FORMAT.md): its media types, building it in the reference's exact
bytes, and checking one we are handed. No I/O here."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from blobmount.errors import InvalidArchive, UsageError
from blobmount.reference import Digest

INDEX_MEDIA_TYPE = "application/vnd.meigma.blob.index.v1+flatbuffers"
DATA_MEDIA_TYPE = "application/vnd.meigma.blob.data.v1"
ARTIFACT_TYPE = "application/vnd.meigma.blob.v1"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_CONFIG = b"{}"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
CREATED_ANNOTATION = "org.opencontainers.image.created"
LIST_MEDIA_TYPES = {
    "application/vnd.oci.image.index.v1+json": "an OCI image index",
    "application/vnd.docker.distribution.manifest.list.v2+json": "a Docker manifest list",
}
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
IMAGE_CONFIG_MEDIA_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)
MAX_INDEX_BYTES = 1 << 30  # ~10M entries of ~100 bytes; far above the reference's 8 MiB refusal
MAX_MANIFEST_BYTES = 4 << 20  # the distribution spec's suggested manifest limit


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int

    def as_json(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}


def created_timestamp(explicit: str | None = None) -> str:
    """RFC 3339 in UTC: --created, else $SOURCE_DATE_EPOCH (reproducible pushes), else now."""
    if explicit:
        return explicit
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            when = datetime.fromtimestamp(int(epoch), tz=UTC)
        except ValueError:
            raise UsageError(f"SOURCE_DATE_EPOCH={epoch!r} is not an integer") from None
    else:
        when = datetime.now(tz=UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def created_ns(body: bytes) -> int | None:
    """The manifest's ``org.opencontainers.image.created`` as nanoseconds since the epoch, or None
    when it is absent or not an RFC 3339 time (it only dates the mount's directories: a bad value
    is no reason to refuse an archive). A time without an offset is taken as UTC; digits past
    microseconds are dropped."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    notes = doc.get("annotations") if isinstance(doc, dict) else None
    text = notes.get(CREATED_ANNOTATION) if isinstance(notes, dict) else None
    if not isinstance(text, str) or len(text) > 64:
        return None
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        whole = int(when.timestamp())
    except (OverflowError, OSError, ValueError):
        return None
    ns = whole * 1_000_000_000 + when.microsecond * 1000
    return ns if -(1 << 63) <= ns < 1 << 63 else None  # st_mtime_ns is a signed 64-bit value


def build_manifest(index: Descriptor, data: Descriptor, annotations: dict[str, str]) -> bytes:
    """The manifest bytes exactly as the reference writes them (key order, compact separators)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": Descriptor(EMPTY_MEDIA_TYPE, Digest.of(EMPTY_CONFIG), len(EMPTY_CONFIG)).as_json(),
        "layers": [index.as_json(), data.as_json()],
        "annotations": annotations,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def file_digest(path: Path) -> tuple[Digest, int]:
    """sha256 digest and size of a file, read in 1 MiB blocks."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            hasher.update(block)
            size += len(block)
    return Digest.parse("sha256:" + hasher.hexdigest()), size


def archive_descriptors(archive_dir: Path) -> tuple[Descriptor, Descriptor]:
    """Descriptors of the index and data blobs of the archive in `archive_dir`."""
    index = Descriptor(INDEX_MEDIA_TYPE, *file_digest(archive_dir / "index.blob"))
    data = Descriptor(DATA_MEDIA_TYPE, *file_digest(archive_dir / "data.blob"))
    return index, data


def archive_manifest(archive_dir: Path, annotations: dict[str, str]) -> bytes:
    """The manifest of the archive in `archive_dir` (index.blob + data.blob)."""
    return build_manifest(*archive_descriptors(archive_dir), annotations)


def descriptor(obj: object, what: str) -> tuple[str, str, int]:
    if not isinstance(obj, dict):
        raise InvalidArchive(f"{what}: descriptor is not an object")
    media, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    # bool is an int to Python, not to JSON: `"size": false` is not a size
    if not isinstance(media, str) or not isinstance(digest, str) or type(size) is not int or size < 0:
        raise InvalidArchive(f"{what}: descriptor lacks mediaType, digest or a valid size")
    try:
        Digest.parse(digest)
    except UsageError as exc:  # a hostile manifest is an invalid archive, not a usage error
        raise InvalidArchive(f"{what}: {exc}") from None
    return media, digest, size


def parse_manifest(body: bytes, what: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """Check a blob-archive manifest (docs/FORMAT.md); return ((index digest, size), (data digest, size))."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArchive(f"{what}: manifest is not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise InvalidArchive(f"{what}: manifest is not a JSON object")
    media = doc.get("mediaType")
    if not isinstance(media, str | None):  # a hostile value must be refused, not crash a lookup
        raise InvalidArchive(f"{what}: mediaType is not a string")
    if media in LIST_MEDIA_TYPES or "manifests" in doc:
        kind = LIST_MEDIA_TYPES.get(str(media), "an image index")
        raise InvalidArchive(f"{what}: names {kind} (a list of images or artifacts), not a blob archive")
    if media == DOCKER_MANIFEST_MEDIA_TYPE:
        raise InvalidArchive(f"{what}: names a Docker container image, not a blob archive")
    if media != MANIFEST_MEDIA_TYPE or doc.get("schemaVersion") != 2:
        raise InvalidArchive(f"{what}: not an OCI image manifest (mediaType {str(media)[:80]!r})")
    config = doc.get("config")
    config_media = config.get("mediaType") if isinstance(config, dict) else None
    if isinstance(config_media, str) and config_media in IMAGE_CONFIG_MEDIA_TYPES:
        raise InvalidArchive(f"{what}: names a container image (config {config_media}), not a blob archive")
    if doc.get("artifactType") != ARTIFACT_TYPE:
        raise InvalidArchive(
            f"{what}: artifactType {str(doc.get('artifactType'))[:80]!r} is not {ARTIFACT_TYPE!r}"
            " (another kind of artifact, not a blob archive)"
        )
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 2:
        count = len(layers) if isinstance(layers, list) else "no"
        raise InvalidArchive(f"{what}: expected exactly 2 layers (index, data), found {count}")
    index_media, index_digest, index_size = descriptor(layers[0], f"{what}: layer 0")
    data_media, data_digest, data_size = descriptor(layers[1], f"{what}: layer 1")
    if index_media != INDEX_MEDIA_TYPE:
        raise InvalidArchive(f"{what}: layer 0 has media type {index_media[:80]!r}, not {INDEX_MEDIA_TYPE!r}")
    if data_media != DATA_MEDIA_TYPE:
        raise InvalidArchive(f"{what}: layer 1 has media type {data_media[:80]!r}, not {DATA_MEDIA_TYPE!r}")
    if index_size > MAX_INDEX_BYTES:
        raise InvalidArchive(f"{what}: index blob of {index_size} bytes exceeds {MAX_INDEX_BYTES}")
    return (index_digest, index_size), (data_digest, data_size)
