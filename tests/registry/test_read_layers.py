"""One cold read, traced: the blobmount modules on the stack where the read enters the fetcher and
where its range request is sent. The layers are handler -> fs -> reader -> the reader's strategy ->
integrity -> fetch (the reading task; a small file is read whole and checked) and
fetch -> remote -> registry client -> session -> transport -> wire (the fetch task), each entered once, in
that order, none calling back up (the mirror indirection once re-entered the source through
closures). A real registry on 127.0.0.1, the real handlers without the kernel."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from blobmount import fetch, sources
from blobmount.cache import CacheDir, ContentStore
from blobmount.fs import BlobFS
from blobmount.index import IndexView
from blobmount.reader import Reader
from blobmount.registry.options import RegistryOptions
from blobmount.registry.wire import WireTransport
from tests.support.helpers import tree_files

READING = [  # recorded as the call enters blobmount.fetch
    "blobmount.handler",
    "blobmount.fs",
    "blobmount.reader",
    "blobmount.smallfiles",
    "blobmount.integrity",
    "blobmount.integrity.whole",
]
REQUEST = [
    "blobmount.fetch_runs",
    "blobmount.sources.remote",
    "blobmount.registry.client",
    "blobmount.registry.session",
    "blobmount.registry.transport",
]  # recorded as the call enters blobmount.registry.wire


def _layers() -> list[str]:
    """blobmount modules on the current stack, outermost first, consecutive repeats merged."""
    names = [f.frame.f_globals.get("__name__", "") for f in reversed(inspect.stack())]
    ours = [n for n in names if n.startswith("blobmount.")]
    return [n for i, n in enumerate(ours) if i == 0 or ours[i - 1] != n]


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[str]]]:
    seen: dict[str, list[list[str]]] = {"read": [], "request": []}
    real_read = fetch.ChunkedSource.read_range
    real_send = WireTransport.handle_async_request

    async def read_range(self: fetch.ChunkedSource, *args: Any, **kw: Any) -> bytes:
        seen["read"].append(_layers())
        return await real_read(self, *args, **kw)

    async def handle(self: WireTransport, request: Any) -> Any:
        if "/blobs/" in request.url.path and "range" in request.headers:
            seen["request"].append(_layers())
        return await real_send(self, request)

    monkeypatch.setattr(fetch.ChunkedSource, "read_range", read_range)
    monkeypatch.setattr(WireTransport, "handle_async_request", handle)
    return seen


def test_a_cold_read_goes_down_the_layers_once(
    pushed: dict[str, str], tmp_path: Path, traced: dict[str, list[list[str]]]
) -> None:
    files = tree_files("uncompressed")
    path, f = max(files.items(), key=lambda item: len(item[1].data))  # raw: straight from the data blob

    async def go() -> bytes:
        settings = sources.RemoteSettings(CacheDir(tmp_path / "cache", 1 << 30), None, False, True)
        archive = await sources.open_source(pushed["uncompressed"], RegistryOptions(), settings)
        assert isinstance(archive.data, fetch.ChunkedSource)
        traced["read"].clear()
        traced["request"].clear()
        view = IndexView(archive.index_bytes, blob_size=archive.data.size)
        async with archive.data.serving():
            handlers = BlobFS(view, Reader(archive.data, ContentStore(tmp_path / "content")))
            ino = 1
            for part in path.split(b"/"):
                ino = (await handlers.lookup(ino, part, pyfuse3.RequestContext())).st_ino
            fh = (await handlers.open(ino, os.O_RDONLY, pyfuse3.RequestContext())).fh
            data = bytes(await handlers.read(fh, 0, len(f.data)))
            await handlers.release(fh)
        await archive.data.aclose()
        return data

    assert trio.run(go)[:4096] == f.data[:4096]
    assert traced["read"], "the read never reached the fetcher"
    assert traced["request"], "the cold read sent no range request"
    for layers in traced["read"]:
        assert layers == READING, layers
    for layers in traced["request"]:
        assert layers == REQUEST, layers
