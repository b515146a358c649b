"""Pieces whose disk write has not landed (blobmount/pieces.py): still served, never fetched twice,
never taken for missing by the integrity check, bounded, and not resurrected by a purge's race.

A worker thread's write is held at an event, so "not landed yet" is a state the test holds rather
than a race it hopes to see (found with a blocked store and a piece pushed out of the 4 MiB tier)."""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import pytest
import trio

from blobmount import pieces as pieces_module
from blobmount.cache import CacheDir
from blobmount.errors import TransientError
from blobmount.pieces import PIECE_BYTES, Pieces
from blobmount.registry.retry import Retry
from tests.support.aio import run

COUNT = 8
BLOB = bytes((i * 7 + i // 251) & 0xFF for i in range(COUNT * PIECE_BYTES))


class Origin:
    """The data blob's bytes, a request counter, and a gate on the disk writes."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, int]] = []
        self.gate = threading.Event()

    async def fetch(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        self.requests.append((start, end))
        yield BLOB[start:end]


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.gate.set()  # never leave a worker thread waiting


def make(tmp_path: Path, origin: Origin, timeout_s: float = 10.0) -> Pieces:
    p = Pieces(
        CacheDir(tmp_path / "cache"),
        "ab" * 32,
        len(BLOB),
        origin.fetch,
        retry=Retry(),
        timeout_s=timeout_s,
        on_fetched=lambda n: None,
    )
    store = p.store.store

    def gated(index: int, data: bytes, digest: int | None = None) -> bool:
        assert origin.gate.wait(30), "the test never opened the gate"
        return store(index, data, digest)

    p.store.store = gated  # type: ignore[method-assign]
    return p


def span(index: int) -> tuple[int, int]:
    return index * PIECE_BYTES + 100, index * PIECE_BYTES + 100 + 4096


def test_a_piece_evicted_before_its_write_landed_is_served_not_fetched_again(tmp_path: Path, origin: Origin) -> None:
    async def main() -> None:
        p = make(tmp_path, origin)
        async with trio.open_nursery() as nursery:
            p.attach(nursery)
            start, end = span(3)
            assert await p.read(start, end) == BLOB[start:end]
            p.store.forget(3)  # pushed out of the memory tier by other pieces
            assert p.store.memory_get(3) is None
            assert not p.store.on_disk(3)
            assert await p.read(start, end) == BLOB[start:end]
            assert await p.get(3) == BLOB[3 * PIECE_BYTES : 4 * PIECE_BYTES]  # what pieces_agree compares
            assert len(origin.requests) == 1
            origin.gate.set()  # the nursery's end waits for the write
        assert not p._unsaved
        assert p.store.on_disk(3)
        p.store.forget(3)
        assert await p.get(3) == BLOB[3 * PIECE_BYTES : 4 * PIECE_BYTES]  # from disk now
        assert len(origin.requests) == 1

    run(main)


def test_a_piece_purged_while_being_written_is_deleted_once_the_write_lands(tmp_path: Path, origin: Origin) -> None:
    async def main() -> None:
        p = make(tmp_path, origin)
        async with trio.open_nursery() as nursery:
            p.attach(nursery)
            start, end = span(5)
            await p.read(start, end)
            p.purge(5 * PIECE_BYTES, 6 * PIECE_BYTES)
            assert await p.get(5) is None  # purged: no longer served from the unsaved table
            origin.gate.set()  # the nursery's end waits for the write and the deletion after it
        assert not p._unwanted
        assert not p._unsaved
        assert not p.store.on_disk(5)

    run(main)


def test_unsaved_pieces_are_bounded_a_read_past_the_bound_waits_for_the_writes(
    tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        monkeypatch.setattr(pieces_module, "UNSAVED_PIECES", 2)
        p = make(tmp_path, origin, timeout_s=0.5)
        async with trio.open_nursery() as nursery:
            p.attach(nursery)
            for index in (1, 3):
                await p.read(*span(index))
            assert len(p._unsaved) == 2
            with pytest.raises(TransientError, match="did not arrive within --timeout"):
                await p.read(*span(6))  # no room while the disk holds the other two
            assert len(p._unsaved) == 2
            origin.gate.set()
            start, end = span(6)
            assert await p.read(start, end) == BLOB[start:end]  # the writes landed: room again

    run(main)
