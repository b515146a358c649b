"""The lazy sha256 runs on a worker thread (blobmount/integrity/lazy.py), and the decision waits for it.

The bytes served in order are queued and hashed on a worker thread, so ``hashed_upto`` runs ahead
of the hasher. The read that completes the file must still wait for every queued byte to be in
the hash before it returns: held here at a threading event inside the worker, that read may not
end (with the right bytes or wrong ones) until the worker is released, and then it gets EIO when
the stored bytes are wrong. Without a kernel: a local archive is read inline, so once every trio
task is blocked the whole read has either ended or is waiting (for the worker, or the verdict).
"""

from __future__ import annotations

import errno
import hashlib
import random
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from blobmount.integrity import lazy
from blobmount.reader import ReaderConfig
from tests.support.aio import run
from tests.support.corpus import Spec, write_archive
from tests.support.handlers import read_file, serving, verified_state

KiB, MiB = 1 << 10, 1 << 20
FILE_BYTES = 2 * lazy.HAND_OFF_BYTES + 777  # lazy under --verify-threshold 256K; three hand-offs
assert FILE_BYTES < lazy.PENDING_BYTES  # read whole while the worker is held (no back-pressure wait)
CONFIG = ReaderConfig(verify_threshold=256 * KiB)
GUARD_S = 60.0


@pytest.mark.expect_log(r"sha256 mismatch|poisoned")
@pytest.mark.parametrize("flipped", [False, True], ids=["right", "flipped"])
def test_the_completing_read_waits_for_the_worker_thread_hash(
    flipped: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One open reads the whole file while the worker thread is held on its first batch: the read
    does not end before the worker is released; then it ends with the right bytes (verified) or,
    one byte flipped near the end, EIO (poisoned). Every byte went through the worker thread
    (none hashed on the trio thread), in order."""
    data = random.Random(11).randbytes(FILE_BYTES)
    stored = bytearray(data)
    if flipped:
        stored[FILE_BYTES - 100] ^= 0x01
    write_archive(tmp_path / "archive", [Spec(b"pad", bytes(MiB)), Spec(b"big.bin", data, stored=bytes(stored))])

    trio_thread = threading.get_ident()
    entered, release = threading.Event(), threading.Event()
    fed: list[tuple[int, int]] = []  # (thread, bytes) of each batch
    mirror = hashlib.sha256()  # what the worker hashed, in the order it hashed it
    real_update = lazy._update

    def held_update(hasher: hashlib._Hash, chunks: list[bytes | memoryview]) -> None:
        if not entered.is_set():
            entered.set()
            assert release.wait(GUARD_S), "the test never released the worker"
        fed.append((threading.get_ident(), sum(len(c) for c in chunks)))
        for chunk in chunks:
            mirror.update(chunk)
        real_update(hasher, chunks)

    monkeypatch.setattr(lazy, "_update", held_update)
    got: list[bytes | int] = []

    async def body() -> None:
        async with serving(f"dir:{tmp_path / 'archive'}", tmp_path / "cache", CONFIG) as s:
            with trio.fail_after(GUARD_S):
                async with trio.open_nursery() as nursery:

                    async def whole() -> None:
                        got.append(await read_file(s.fs, "big.bin"))

                    nursery.start_soon(whole)
                    try:
                        await trio.to_thread.run_sync(entered.wait, GUARD_S)
                        await trio.testing.wait_all_tasks_blocked()
                        assert not got, "the read that completed the file ended before its hash was done"
                    finally:
                        release.set()
                outcome = got[0] if isinstance(got[0], int) else "right bytes" if got[0] == data else "wrong bytes"
                if flipped:
                    assert outcome == errno.EIO, f"a full read of a flipped file ended with {outcome}, not EIO"
                    assert await read_file(s.fs, "big.bin") == errno.EIO  # from the origin: still wrong
                    assert await verified_state(s.fs, "big.bin") == b"poisoned"
                else:
                    assert outcome == "right bytes"
                    assert await verified_state(s.fs, "big.bin") == b"verified"

    run(body)
    assert fed, "nothing was hashed on a worker thread"
    assert all(thread != trio_thread for thread, _ in fed), "the sha256 ran on the trio thread"
    assert sum(n for _, n in fed) == FILE_BYTES, "not every byte was hashed on the worker thread"
    assert mirror.digest() == hashlib.sha256(stored).digest(), "the worker hashed the bytes out of order"
