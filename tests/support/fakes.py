"""Fakes for unit tests of fault paths (the real registry proves each feature elsewhere): a remote
data blob in memory for the fetch layer, which counts requests and injects one scripted fault per
request; and a registry behind httpx.MockTransport for the OCI client."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import httpx
import trio

from blobmount.errors import SourceError, TransientError
from blobmount.reference import Digest, Reference
from blobmount.registry.client import RegistryClient, RegistryOptions

FAULTS = ("refuse", "reset", "truncate", "stall", "fatal", "corrupt")


@dataclass
class FakeRemote:
    blob: bytes
    block_bytes: int = 1000  # bodies arrive in blocks that do not align with chunks
    faults: list[str | None] = field(default_factory=list)  # one per request, None = behave
    requests: list[tuple[int, int, bool]] = field(default_factory=list)
    gate: trio.Event | None = None  # when set, the body pauses after `gate_after` bytes until it is
    gate_after: int = 0
    block_delay_s: float = 0.0

    @property
    def size(self) -> int:
        return len(self.blob)

    async def iter_range(self, start: int, end: int, *, origin_only: bool = False) -> AsyncGenerator[bytes, None]:
        if not 0 <= start < end <= len(self.blob):
            raise SourceError(f"bad range {start}-{end}")
        self.requests.append((start, end, origin_only))
        fault = self.faults.pop(0) if self.faults else None
        if fault == "refuse":
            raise TransientError("connection refused (injected)")
        if fault == "fatal":
            raise SourceError("404 (injected)")
        pos = start
        while pos < end:
            await trio.sleep(self.block_delay_s)
            if self.gate is not None and pos - start >= self.gate_after:
                await self.gate.wait()
            n = min(self.block_bytes, end - pos)
            if fault == "stall":
                await trio.sleep_forever()
            if fault == "reset" and pos - start >= (end - start) // 2:
                raise TransientError("connection reset (injected)")
            if fault == "truncate" and pos + n >= end:
                return
            data = self.blob[pos : pos + n]
            if fault == "corrupt":
                data = bytes([data[0] ^ 0xFF]) + data[1:]
                fault = None
            yield data
            pos += n

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


# -- a registry behind httpx.MockTransport: one blob, ranges answered exactly --------------------

BLOB = bytes(range(256)) * 64
DIGEST = Digest.of(BLOB)
REF = Reference.parse("registry.test:5000/team/assets:v3")


def ranged(request: httpx.Request) -> httpx.Response:
    first, last = (int(x) for x in request.headers["range"].removeprefix("bytes=").split("-"))
    headers = {"Content-Range": f"bytes {first}-{last}/{len(BLOB)}"}
    return httpx.Response(206, headers=headers, content=BLOB[first : last + 1])


def client(handler: object, **options: object) -> RegistryClient:
    return RegistryClient(REF, RegistryOptions(**options), transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
