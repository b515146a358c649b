"""The hashing thread of a streaming decode: sha256 and xxh3 of the decoded blocks, and their write.

Why a thread of its own: zstd, hashlib and the write each release the GIL, so on two cores the
decoder goes on with the next block while this thread hashes and writes the last one
(decode.py). The blocks live in a few recycled buffers, so a multi-GB decode makes no garbage.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable

import xxhash

STEP_BYTES = 1 << 20  # decoder output per step: one watermark update, one hop to the trio thread
HASH_QUEUE = 8  # decoded blocks waiting for the hashing thread (memory: this many STEP_BYTES)
BUFFERS = HASH_QUEUE + 2  # output buffers the decoder fills in turn (one being filled, one hashed)


class Hashing:
    """sha256 and xxh3 of the decoded blocks, and `sink(pos, block)` (write and publish), on a thread
    of their own: the decoder goes on with the next block meanwhile (zstd, hashlib and the write
    each release the GIL, so on two cores the decode no longer waits for them).

    The blocks live in at most ``BUFFERS`` recycled bytearrays, made as they are first needed (making
    all ten at once cost 6-9 ms before the first byte): the decoder takes one (:meth:`buffer`, which
    waits while all are queued), fills it, hands it over (:meth:`put`); this thread gives it back
    once it is hashed and written. The sink must not keep the block (it copies or writes it), but
    may keep its buffer (``block.obj``) by returning True, and give it back with :meth:`recycle`
    (``extra`` more buffers may be made for the ones it keeps). `after_first()` runs on this thread
    once the first block is out (work that must not delay it)."""

    def __init__(
        self,
        sink: Callable[[int, memoryview], bool],
        after_first: Callable[[], None] | None = None,
        extra: int = 0,
    ) -> None:
        self._queue: queue.Queue[tuple[int, bytearray, int] | None] = queue.Queue(HASH_QUEUE)
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._made = 0  # buffers made so far (the decoder's thread only)
        self._most = BUFFERS + extra
        self._sink = sink
        self._after_first = after_first
        self._sha256 = hashlib.sha256()
        self._xxh3 = xxhash.xxh3_64()
        self.error: BaseException | None = None  # the sink failed: the decode fails with it
        self._thread = threading.Thread(target=self._run, name="blobmount-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            pos, buf, n = item
            kept = False
            try:
                if self.error is not None:
                    continue  # drained, so the decoder never blocks on a full queue
                block = memoryview(buf)[:n]
                self._sha256.update(block)
                self._xxh3.update(block)
                try:
                    kept = self._sink(pos, block)
                    if self._after_first is not None:
                        after, self._after_first = self._after_first, None
                        after()
                except BaseException as exc:  # handed to the decoder's thread
                    self.error = exc
                finally:
                    block.release()
            finally:
                if not kept:
                    self._free.put(buf)

    def buffer(self) -> bytearray:
        """A free output buffer of ``STEP_BYTES`` (waits while every one is queued)."""
        if self.error is not None:
            raise self.error
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._made < self._most:
                self._made += 1
                return bytearray(STEP_BYTES)
        return self._free.get()

    def recycle(self, buf: bytearray) -> None:
        """`buf` is free again (any thread)."""
        self._free.put(buf)

    def put(self, pos: int, buf: bytearray, n: int) -> None:
        """Hash, write and publish ``buf[:n]`` (decoded bytes [pos, pos + n)); `buf` comes back
        to :meth:`buffer` once done."""
        if self.error is not None:
            raise self.error
        self._queue.put((pos, buf, n))

    def close(self, check: bool = True) -> tuple[bytes, int]:
        """Waits for the blocks put so far; returns (sha256, xxh3), or (`check`) raises the sink's
        error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if check and self.error is not None:
            raise self.error
        return self._sha256.digest(), int(self._xxh3.intdigest())
