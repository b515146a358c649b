"""`blobmount push`: upload an archive's blobs, the empty config and a manifest in the reference's
exact shape. Blobs the registry already has are skipped; the manifest goes last, so an interrupted
push never moves the tag."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import trio

from blobmount.errors import UsageError
from blobmount.reference import Digest, Reference
from blobmount.registry.client import RegistryClient, RegistryOptions
from blobmount.source import ARTIFACT_TYPE, DATA_MEDIA_TYPE, INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE

EMPTY_CONFIG = b"{}"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
CREATED_ANNOTATION = "org.opencontainers.image.created"
UPLOAD_BLOCK_BYTES = 1 << 20


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


def _file_digest(path: Path) -> tuple[Digest, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(UPLOAD_BLOCK_BYTES):
            hasher.update(block)
            size += len(block)
    return Digest.parse("sha256:" + hasher.hexdigest()), size


async def _file_chunks(path: Path, size: int, label: str) -> AsyncIterator[bytes]:
    show = sys.stderr.isatty() and size >= 16 << 20
    sent = 0
    started = time.monotonic()
    async with await trio.open_file(path, "rb") as f:
        while block := await f.read(UPLOAD_BLOCK_BYTES):
            sent += len(block)
            if show:
                rate = sent / max(time.monotonic() - started, 1e-6) / 1e6
                sys.stderr.write(f"\rpush {label}: {sent * 100 // size:3d}% {sent >> 20} MiB {rate:.0f} MB/s")
            yield block
    if show:
        sys.stderr.write("\n")


async def push_archive(
    archive_dir: Path,
    ref: Reference,
    options: RegistryOptions,
    *,
    created: str | None = None,
    annotations: dict[str, str] | None = None,
) -> Digest:
    """Push `archive_dir` (index.blob + data.blob) to `ref`; return the manifest digest."""
    if ref.digest is not None and ref.tag is None:
        raise UsageError(f"{ref}: push needs a tag, not a digest")
    index_path, data_path = archive_dir / "index.blob", archive_dir / "data.blob"
    index_digest, index_size = await trio.to_thread.run_sync(_file_digest, index_path)
    data_digest, data_size = await trio.to_thread.run_sync(_file_digest, data_path)
    client = RegistryClient(ref, options, push=True)
    try:
        config_digest = Digest.of(EMPTY_CONFIG)
        if not await client.blob_exists(config_digest):
            await client.upload_blob(config_digest, len(EMPTY_CONFIG), EMPTY_CONFIG)
        for path, digest, size, label in (
            (index_path, index_digest, index_size, "index"),
            (data_path, data_digest, data_size, "data"),
        ):
            if await client.blob_exists(digest):
                continue
            await client.upload_blob(digest, size, _file_chunks(path, size, label))
        notes = {CREATED_ANNOTATION: created_timestamp(created)}
        notes.update(annotations or {})
        manifest = build_manifest(
            Descriptor(INDEX_MEDIA_TYPE, index_digest, index_size),
            Descriptor(DATA_MEDIA_TYPE, data_digest, data_size),
            notes,
        )
        return await client.put_manifest(ref.tag or "latest", manifest, MANIFEST_MEDIA_TYPE)
    finally:
        await client.aclose()
