"""Races of the lazy hash (blobmount/integrity/lazy.py) made deterministic, without a kernel.

A lazily verified file is decided once every byte was served: by the read that completes it, or,
for a file read in part and closed, by a completion that hashes its rest from the source. That
decision awaits (it reads the rest), and reads of the file by another open can be served in that
window. The promise of tests/fuse/test_lazy_trust.py is that a read of a file to its end gets the
right bytes or EIO: such a read may not end with the wrong bytes because it ran while the verdict
was pending. Here the verdict is held at a trio event while the other open reads, so the window is
not a matter of timing: a local archive is read inline (no worker thread), so once every task is
blocked, the other open has either finished or is waiting for the verdict.
"""

from __future__ import annotations

import errno
import hashlib
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from blobmount.errors import SourceError
from blobmount.index import Entry
from blobmount.integrity import Integrity, lazy
from blobmount.integrity.whole import hash_range
from blobmount.reader import ReaderConfig
from blobmount.sources.base import RangeSource
from tests.support.aio import run
from tests.support.corpus import Spec, write_archive
from tests.support.handlers import read_file, serving, verified_state

KiB, MiB = 1 << 10, 1 << 20
FILE_BYTES = 3 * MiB + 12345  # lazy under --verify-threshold 256K; its rest is hashed at close
CONFIG = ReaderConfig(verify_threshold=256 * KiB)
GUARD_S = 60.0


def _archive(out: Path, *, flipped: bool) -> bytes:
    """An archive holding big.bin, stored with one byte flipped at 80 % if `flipped`: the right bytes."""
    data = random.Random(7).randbytes(FILE_BYTES)
    stored = bytearray(data)
    if flipped:
        stored[FILE_BYTES * 8 // 10] ^= 0x01
    write_archive(out, [Spec(b"pad", bytes(MiB)), Spec(b"big.bin", data, stored=bytes(stored))])
    assert (hashlib.sha256(stored).digest() != hashlib.sha256(data).digest()) == flipped
    return data


@pytest.mark.expect_log(r"sha256 mismatch|poisoned")
@pytest.mark.parametrize("verdict", ["mismatch", "match", "stopped"])
def test_a_full_read_by_another_open_while_a_close_completes_the_hash(
    verdict: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first open reads the head (the right bytes) and closes: the completion starts hashing
    the rest and is held there. A second open reads the whole file meanwhile. `mismatch`: the
    file's stored bytes are wrong past the head, so that whole read must fail (it holds the
    flipped byte), not end before the verdict. `match`: it gets the right bytes. `stopped`: the
    completion fails (a source error): the reads that waited for it are hashed in order again,
    and the file is verified by the second open's read."""
    data = _archive(tmp_path / "archive", flipped=verdict == "mismatch")
    entered, release = trio.Event(), trio.Event()

    async def held_hash_range(source: RangeSource, entry: Entry, start: int, hasher: hashlib._Hash) -> None:
        first = not entered.is_set()
        entered.set()
        await release.wait()
        if first and verdict == "stopped":
            raise SourceError("the cache went away")
        await hash_range(source, entry, start, hasher)

    monkeypatch.setattr(lazy, "hash_range", held_hash_range)
    got: list[bytes | int] = []

    async def body() -> None:
        async with serving(f"dir:{tmp_path / 'archive'}", tmp_path / "cache", CONFIG) as s:
            with trio.fail_after(GUARD_S):
                head = await read_file(s.fs, "big.bin", 0, FILE_BYTES // 2)
                assert head == data[: FILE_BYTES // 2]  # a flipped byte is past the head
                await entered.wait()  # the close's completion is hashing the rest
                assert await verified_state(s.fs, "big.bin") == b"unverified"

                async with trio.open_nursery() as nursery:

                    async def whole() -> None:
                        got.append(await read_file(s.fs, "big.bin"))

                    nursery.start_soon(whole)
                    await trio.testing.wait_all_tasks_blocked()  # finished, or waiting for the verdict
                    release.set()
                outcome = got[0] if isinstance(got[0], int) else "right bytes" if got[0] == data else "wrong bytes"
                if verdict == "mismatch":
                    assert outcome == errno.EIO, f"a full read during the completion ended with {outcome}, not EIO"
                    assert await read_file(s.fs, "big.bin") == errno.EIO  # from the origin: still wrong
                    assert await verified_state(s.fs, "big.bin") == b"poisoned"
                else:
                    assert outcome == "right bytes"
                    assert await verified_state(s.fs, "big.bin") == b"verified"

    run(body)


@pytest.mark.expect_log(r"bytes were served|failed|went away")
def test_a_decision_that_fails_after_the_hash_leaves_the_file_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decision's last step (the pieces' comparison) fails once, after the hash is complete:
    that read fails, and the next read of the whole file is hashed afresh and gets the right
    bytes. Found by reading: the decision was left marked as under way, and every later read of
    the file waited for a verdict that had already been given up (a busy loop until EIO)."""
    data = _archive(tmp_path / "archive", flipped=False)
    calls: list[str] = []
    original = Integrity.pieces_agree

    async def failing_once(self: Integrity, entry: Entry) -> bool:
        calls.append(entry.path.decode())
        if len(calls) == 1:
            raise SourceError("the cache went away")
        return await original(self, entry)

    monkeypatch.setattr(Integrity, "pieces_agree", failing_once)

    async def body() -> None:
        async with serving(f"dir:{tmp_path / 'archive'}", tmp_path / "cache", CONFIG) as s:
            with trio.fail_after(GUARD_S):
                first = await read_file(s.fs, "big.bin")
                assert first == errno.EIO, "the read whose decision failed"
                assert await verified_state(s.fs, "big.bin") == b"unverified"
                assert await read_file(s.fs, "big.bin") == data
                assert await verified_state(s.fs, "big.bin") == b"verified"
        assert calls == ["big.bin", "big.bin"]

    run(body)
