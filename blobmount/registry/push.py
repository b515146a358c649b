"""`blobmount push`: upload an archive's blobs, the empty config and a manifest in the reference's
exact shape. Blobs the registry already has are skipped; the manifest goes last, so an interrupted
push never moves the tag."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from blobmount.errors import UsageError
from blobmount.manifest import (
    CREATED_ANNOTATION,
    EMPTY_CONFIG,
    MANIFEST_MEDIA_TYPE,
    archive_descriptors,
    build_manifest,
    created_timestamp,
)
from blobmount.reference import Digest, Reference
from blobmount.registry.client import RegistryClient, RegistryOptions

UPLOAD_BLOCK_BYTES = 1 << 20


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
    index_desc, data_desc = await trio.to_thread.run_sync(archive_descriptors, archive_dir)
    index_digest, index_size = index_desc.digest, index_desc.size
    data_digest, data_size = data_desc.digest, data_desc.size
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
        manifest = build_manifest(index_desc, data_desc, notes)
        return await client.put_manifest(ref.tag or "latest", manifest, MANIFEST_MEDIA_TYPE)
    finally:
        await client.aclose()
