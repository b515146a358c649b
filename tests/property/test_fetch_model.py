"""Random read sequences over random blobs, through the chunk cache, with faults injected at random:
every read returns exactly the reference slice or fails with a SourceError, never other bytes; once
the faults stop, every range reads correctly (a transient fault leaves nothing behind).

Two layers of faults: the fetch layer's own (an in-memory remote that refuses, resets or truncates),
and HTTP answers a registry could give (through the real RegistryClient and RegistryBlobSource over
httpx.MockTransport: resets, short and long bodies, a wrong Content-Range, 503)."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from blobmount.cache import CacheDir, ChunkStore
from blobmount.errors import SourceError
from blobmount.fetch import ChunkedSource
from blobmount.readahead import ReadHint
from blobmount.reference import Digest, Reference
from blobmount.registry.client import RegistryClient, RegistryOptions
from blobmount.registry.mirrors import Endpoints
from blobmount.sources.remote import RegistryBlobSource
from tests.support.fakes import FakeRemote

EXAMPLES = int(os.environ.get("BLOBMOUNT_FUZZ_EXAMPLES", "60"))
MODEL = settings(max_examples=EXAMPLES, deadline=None, derandomize=True)


def blobs(max_size: int) -> st.SearchStrategy[bytes]:
    """Blobs of any size up to `max_size` (st.binary stays small: chunk boundaries need size)."""
    return st.builds(lambda n, seed: random.Random(seed).randbytes(n), st.integers(1, max_size), st.integers(0, 999))


reads = st.lists(
    st.tuples(st.floats(0, 1), st.integers(1, 70_000), st.sampled_from(["none", "file", "dir"])),
    min_size=1,
    max_size=25,
)


def _check(src: ChunkedSource, blob: bytes, ops: list[tuple[float, int, str]]) -> None:
    async def go() -> None:
        async with src.serving():
            hints = {"file": ReadHint(0, len(blob)), "dir": ReadHint(0, len(blob), directory=True)}
            for frac, length, kind in ops:
                start = int(frac * (len(blob) - 1))
                end = min(len(blob), start + length)
                try:
                    got = await src.read_range(start, end, hints.get(kind))
                except SourceError:
                    continue
                assert got == blob[start:end]
            faults = getattr(src.remote, "faults", None)
            if faults is not None:
                faults.clear()
            else:
                src.remote.healthy = True  # type: ignore[attr-defined]
            for frac, length, _kind in ops:
                start = int(frac * (len(blob) - 1))
                end = min(len(blob), start + length)
                assert await src.read_range(start, end) == blob[start:end]

    # No deadline is in play (timeout_s is huge): the clock only skips the retry pauses.
    trio.run(go, clock=trio.testing.MockClock(autojump_threshold=0.02))


@MODEL
@given(
    blob=blobs(200_000),
    chunk=st.sampled_from([1024, 4096, 16384]),
    ops=reads,
    faults=st.lists(st.sampled_from([None, None, None, "refuse", "reset", "truncate"]), max_size=30),
    on_disk=st.booleans(),
)
@pytest.mark.expect_log(r"; retry \d+ in ", r"^blobmount\.fetch: data blob bytes ")
def test_reads_through_the_cache_equal_the_reference(
    blob: bytes, chunk: int, ops: list[tuple[float, int, str]], faults: list[str | None], on_disk: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache = CacheDir(Path(tmp) / "c", 64 * chunk) if on_disk else None
        remote = FakeRemote(blob, block_bytes=777, faults=list(faults))
        store = ChunkStore(cache, "cd" * 32, len(blob), chunk, memory_bytes=4 * chunk)
        src = ChunkedSource(remote, store, timeout_s=1e6, request_bytes=4 * chunk, ahead_bytes=8 * chunk)
        _check(src, blob, ops)


class _Body(httpx.AsyncByteStream):
    def __init__(self, data: bytes, fail_after: int | None) -> None:
        self.data = data
        self.fail_after = fail_after

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for i in range(0, len(self.data), 500):
            if self.fail_after is not None and i >= self.fail_after:
                raise httpx.ReadError("connection reset (injected)")
            yield self.data[i : i + 500]


class _FaultyRegistry:
    """A registry's blob endpoint over MockTransport with one scripted HTTP fault per request."""

    def __init__(self, blob: bytes, faults: list[str | None]) -> None:
        self.blob = blob
        self.faults = faults
        self.healthy = False

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        first, last = (int(x) for x in request.headers["range"].removeprefix("bytes=").split("-"))
        fault = None if self.healthy or not self.faults else self.faults.pop(0)
        body = self.blob[first : last + 1]
        headers = {"Content-Range": f"bytes {first}-{last}/{len(self.blob)}"}
        if fault == "503":
            return httpx.Response(503)
        if fault == "wrong-range":
            headers["Content-Range"] = f"bytes {first + 1}-{last + 1}/{len(self.blob)}"
        if fault == "short":
            body = body[: len(body) // 2]
        if fault == "long":
            body += b"extra bytes"
        if fault == "reset":
            return httpx.Response(206, headers=headers, stream=_Body(body, len(body) // 2))
        return httpx.Response(206, headers=headers, stream=_Body(body, None))


@MODEL
@given(
    blob=blobs(100_000),
    ops=reads,
    faults=st.lists(st.sampled_from([None, None, "503", "wrong-range", "short", "long", "reset"]), max_size=20),
)
@pytest.mark.expect_log(r"; retry \d+ in ", r"^blobmount\.fetch: data blob bytes ")
def test_registry_faults_never_become_wrong_bytes(
    blob: bytes, ops: list[tuple[float, int, str]], faults: list[str | None]
) -> None:
    ref = Reference.parse("registry.test:5000/team/assets:v1")
    options = RegistryOptions(timeout_s=5.0)
    handler = _FaultyRegistry(blob, list(faults))
    remote = RegistryBlobSource(ref, options, Digest.of(blob), len(blob))
    origin = RegistryClient(ref, options, transport=httpx.MockTransport(handler), max_attempts=2)
    remote._endpoints = Endpoints(ref, options, origin=origin)
    store = ChunkStore(None, "ef" * 32, len(blob), 4096, memory_bytes=4 * 4096)
    src = ChunkedSource(remote, store, timeout_s=1e6, request_bytes=4 * 4096, ahead_bytes=8 * 4096)
    try:
        _check(src, blob, ops)
    finally:
        trio.run(remote.aclose)
