"""`blobmount push`: upload an archive's blobs, the empty config and a manifest in the reference's
exact shape. Blobs the registry already has are skipped (a HEAD each); large blobs go up in
chunks; the manifest goes last, so an interrupted push never moves the tag."""

from __future__ import annotations

import logging
import os
import sys
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
from blobmount.progress import ProgressLine
from blobmount.reference import Digest, Reference
from blobmount.registry.client import BlobReader, RegistryClient, RegistryOptions, bytes_reader

log = logging.getLogger(__name__)

CHUNKED_ABOVE_BYTES = 64 << 20  # larger blobs go up in chunks: a failure resends one chunk, and
# proxies in front of registries often cap request bodies near 100 MB
UPLOAD_CHUNK_BYTES = 16 << 20  # >= 5 MiB, the smallest non-final chunk S3-backed registries accept
PROGRESS_MIN_BYTES = 16 << 20  # smaller blobs go up too fast for a progress line to help


def _file_reader(fd: int, progress: ProgressLine) -> BlobReader:
    async def read_at(offset: int, length: int) -> bytes:
        data = await trio.to_thread.run_sync(os.pread, fd, length, offset)
        progress.reach(offset + len(data))
        return data

    return read_at


async def push_archive(
    archive_dir: Path,
    ref: Reference,
    options: RegistryOptions,
    *,
    created: str | None = None,
    annotations: dict[str, str] | None = None,
    progress: bool | None = None,
    chunked_above: int = CHUNKED_ABOVE_BYTES,
    chunk_bytes: int = UPLOAD_CHUNK_BYTES,
) -> Digest:
    """Push `archive_dir` (index.blob + data.blob) to `ref`; return the manifest digest.
    `progress` None: a progress line when stderr is a terminal and a blob is large."""
    if ref.digest is not None and ref.tag is None:
        raise UsageError(f"{ref}: push needs a tag, not a digest")
    index_desc, data_desc = await trio.to_thread.run_sync(archive_descriptors, archive_dir)
    client = RegistryClient(ref, options, push=True)
    try:
        config_digest = Digest.of(EMPTY_CONFIG)
        if not await client.blob_exists(config_digest):
            await client.upload_blob(config_digest, len(EMPTY_CONFIG), bytes_reader(EMPTY_CONFIG))
        for label, desc in (("index", index_desc), ("data", data_desc)):
            if await client.blob_exists(desc.digest):
                log.info("%s: %s blob %s is already there; not uploaded", ref, label, desc.digest)
                continue
            show = progress if progress is not None else sys.stderr.isatty() and desc.size >= PROGRESS_MIN_BYTES
            bar = ProgressLine(f"push {label}", desc.size, enabled=show)
            fd = os.open(archive_dir / f"{label}.blob", os.O_RDONLY)
            try:
                chunks = chunk_bytes if desc.size > chunked_above else None
                await client.upload_blob(desc.digest, desc.size, _file_reader(fd, bar), chunk_bytes=chunks)
            finally:
                os.close(fd)
                bar.close()
        notes = {CREATED_ANNOTATION: created_timestamp(created)}
        notes.update(annotations or {})
        manifest = build_manifest(index_desc, data_desc, notes)
        return await client.put_manifest(ref.tag or "latest", manifest, MANIFEST_MEDIA_TYPE)
    finally:
        await client.aclose()
