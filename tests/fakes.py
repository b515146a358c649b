"""A remote data blob in memory, for unit tests of the fetch layer's fault paths (the real registry
proves the feature elsewhere): it counts requests and injects one scripted fault per request."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import trio

from blobmount.errors import SourceError, TransientError

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
