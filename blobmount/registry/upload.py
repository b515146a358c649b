"""Uploading blobs and manifests (the push side of the distribution API): monolithic and chunked
upload sessions, restarted when the registry loses one, and the manifest PUT.

Retries: each request is retried by the session's one loop (session.Session.request) when its body
can be sent again; a session that is lost (a PATCH answered 416/404 because an earlier answer went
missing) or a streamed PUT that breaks is the one thing retried here, by starting the upload over
in a new session, at most UPLOAD_ATTEMPTS times, with the same backoff. An ordinary failure that
used up the request's own attempts is not retried a second time here (never loops within loops).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urljoin

from blobmount.errors import SourceError, TransientError
from blobmount.reference import Digest
from blobmount.registry.transport import read_limited, release

if TYPE_CHECKING:
    import httpx

    from blobmount.registry.client import RegistryClient

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3  # whole-upload restarts after a lost session or a broken streamed body
UPLOAD_BLOCK_BYTES = 1 << 20  # a monolithic upload streams the body in blocks of this size

BlobReader = Callable[[int, int], Awaitable[bytes]]  # (offset, length) -> those bytes of the blob


class UploadLost(TransientError):
    """The registry no longer accepts this upload session: start the upload over."""


def bytes_reader(data: bytes) -> BlobReader:
    async def read_at(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return read_at


async def _stream(read_at: BlobReader, size: int, block: int) -> AsyncGenerator[bytes, None]:
    offset = 0
    while offset < size:
        data = await read_at(offset, min(block, size - offset))
        if not data:
            raise SourceError(f"blob source ended at {offset} of {size} bytes")
        offset += len(data)
        yield data


async def blob_exists(client: RegistryClient, digest: Digest) -> bool:
    response = await client.request("HEAD", f"/v2/{client.ref.repository}/blobs/{digest}", kind="blob-head")
    await release(response)
    return response.status_code == 200


async def upload_blob(
    client: RegistryClient, digest: Digest, size: int, read_at: BlobReader, *, chunk_bytes: int | None = None
) -> None:
    """Upload a blob the registry lacks. Monolithic (a session, then one PUT ?digest= streaming
    the whole body) when `chunk_bytes` is None; else chunked (a PATCH per chunk, then an empty
    PUT ?digest=), so that a failure costs a chunk's retry, not the whole body, and proxies that
    cap request bodies are never hit. Before starting over, a HEAD checks whether the blob
    landed after all."""
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            location = await _start(client)
            if chunk_bytes is None:
                body = _stream(read_at, size, UPLOAD_BLOCK_BYTES)
                headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
                try:
                    await _finish(client, location, digest, body, headers)
                except UploadLost:
                    raise
                except TransientError as exc:  # a streamed body cannot be sent again: a new session
                    raise UploadLost(f"{client.ref}: the upload of {digest} broke ({exc})") from exc
            else:
                location = await _patch_chunks(client, location, size, read_at, chunk_bytes)
                await _finish(client, location, digest, b"", {"Content-Length": "0"})
            return
        except UploadLost as exc:
            if await blob_exists(client, digest):
                return  # the registry has it: only the answer was lost
            if attempt >= UPLOAD_ATTEMPTS:
                raise
            log.warning("%s: upload of %s broke (%s); starting it over", client.ref, digest, exc)
            await client.retry.pause(attempt, exc)


async def _start(client: RegistryClient) -> str:
    response = await client.request("POST", f"/v2/{client.ref.repository}/blobs/uploads/", kind="upload")
    await release(response)
    if response.status_code not in (201, 202):
        raise SourceError(f"{client.ref}: starting an upload answered {response.status_code}")
    return _location(client, response)


def _location(client: RegistryClient, response: httpx.Response) -> str:
    location: str | None = response.headers.get("location")
    if not location:
        raise SourceError(f"{client.ref}: upload session without a Location")
    return urljoin(client.base + "/", location)


async def _patch_chunks(client: RegistryClient, location: str, size: int, read_at: BlobReader, chunk_bytes: int) -> str:
    """PATCH the blob in order, one chunk per request; returns the session's last Location."""
    offset = 0
    async with contextlib.aclosing(_stream(read_at, size, chunk_bytes)) as blocks:
        async for data in blocks:
            end = offset + len(data) - 1
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{end}",
                "Content-Length": str(len(data)),
            }
            response = await client.request("PATCH", location, headers=headers, content=data, kind="upload-chunk")
            await release(response)
            if response.status_code in (400, 404, 416):
                raise UploadLost(f"{client.ref}: upload session refused the chunk at {offset} ({response.status_code})")
            if response.status_code != 202:
                raise SourceError(f"{client.ref}: uploading a chunk answered {response.status_code}")
            if response.headers.get("range", f"0-{end}") != f"0-{end}":
                raise UploadLost(f"{client.ref}: upload session holds {response.headers['range']}, not 0-{end}")
            location = _location(client, response)
            offset = end + 1
    return location


async def _finish(client: RegistryClient, location: str, digest: Digest, body: Any, headers: dict[str, str]) -> None:
    url = location + ("&" if "?" in location else "?") + urlencode({"digest": str(digest)})
    response = await client.request("PUT", url, headers=headers, content=body, kind="upload")
    await release(response)
    if response.status_code in (400, 404, 416):
        raise UploadLost(f"{client.ref}: the upload session of {digest} was lost ({response.status_code})")
    if response.status_code != 201:
        raise SourceError(f"{client.ref}: finishing the upload of {digest} answered {response.status_code}")


async def put_manifest(client: RegistryClient, tag: str, body: bytes, media_type: str) -> Digest:
    response = await client.request(
        "PUT",
        f"/v2/{client.ref.repository}/manifests/{tag}",
        headers={"Content-Type": media_type},
        content=body,
        kind="manifest-put",
    )
    text = (await read_limited(response, 1 << 16, "manifest PUT answer")).decode(errors="replace")
    await response.aclose()
    client.last_oci_subject = response.headers.get("oci-subject")  # the registry indexed `subject`
    if response.status_code != 201:
        raise SourceError(f"{client.ref}: PUT manifest answered {response.status_code}: {text[:200]}")
    return Digest.of(body)
