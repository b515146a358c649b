"""The hashing thread of a streaming decode (blobmount/hashing.py): every block hashed and written
in order, each buffer back to the decoder only once it is written, and a failed write handed to the
decoder without ever leaving it blocked on a full queue. (Written for a try at splitting the hash
and the write over two threads, which measured no faster: bench/results/2026-12-07-s3-quiet.md;
the contract is the same for one thread.)"""

from __future__ import annotations

import hashlib
import random
import threading

import pytest
import xxhash

from blobmount.hashing import BUFFERS, STEP_BYTES, Hashing

BLOCKS = 40  # several times BUFFERS: every buffer is recycled through both threads


def _blocks() -> list[bytes]:
    rng = random.Random(3)
    return [rng.randbytes(STEP_BYTES if i % 3 else STEP_BYTES // 3) for i in range(BLOCKS)]


def test_blocks_are_hashed_and_written_in_order_through_recycled_buffers() -> None:
    blocks = _blocks()
    written: list[tuple[int, bytes]] = []
    seen_buffers: set[int] = set()

    def sink(pos: int, block: memoryview) -> bool:
        written.append((pos, bytes(block)))
        seen_buffers.add(id(block.obj))
        return False

    h = Hashing(sink)
    pos = 0
    for data in blocks:
        buf = h.buffer()
        buf[: len(data)] = data
        h.put(pos, buf, len(data))
        pos += len(data)
    digest, xxh3 = h.close()
    whole = b"".join(blocks)
    assert digest == hashlib.sha256(whole).digest()
    assert xxh3 == xxhash.xxh3_64_intdigest(whole)
    assert [p for p, _ in written] == [sum(map(len, blocks[:i])) for i in range(BLOCKS)]
    assert b"".join(d for _, d in written) == whole
    assert len(seen_buffers) <= BUFFERS  # recycled, never more than the bound


def test_a_buffer_returns_to_the_decoder_only_after_its_write() -> None:
    """The decoder refills a buffer as soon as it gets it back: back before its write, the write
    would take the next block's bytes. The sink checks each block against what was put."""
    blocks = _blocks()
    mismatched: list[int] = []
    gate = threading.Event()

    def sink(pos: int, block: memoryview) -> bool:
        gate.wait(0.001 if pos else 0.2)  # the first write lingers while the decoder runs ahead
        if bytes(block) != expected[pos]:
            mismatched.append(pos)
        return False

    expected: dict[int, bytes] = {}
    h = Hashing(sink)
    pos = 0
    for data in blocks:
        buf = h.buffer()
        buf[: len(data)] = data
        expected[pos] = data
        h.put(pos, buf, len(data))
        pos += len(data)
    h.close()
    assert mismatched == []


def test_a_failed_write_fails_the_decoder_and_never_blocks_it() -> None:
    calls: list[int] = []

    def sink(pos: int, block: memoryview) -> bool:
        calls.append(pos)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return False

    h = Hashing(sink)
    raised: BaseException | None = None
    pos = 0
    for data in _blocks():  # bounded: BLOCKS puts at most; the failure must surface before the end
        try:
            buf = h.buffer()
            buf[: len(data)] = data
            h.put(pos, buf, len(data))
        except OSError as exc:
            raised = exc
            break
        pos += len(data)
    assert raised is not None, "the decoder was never told the write failed"
    with pytest.raises(OSError, match="No space left"):
        h.close()
    assert len(calls) == 2  # nothing written after the failure
