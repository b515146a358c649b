"""The one LRU (blobmount/lru.py): byte budgets and counts, and what its owners rely on."""

from __future__ import annotations

from blobmount.cache import ChunkStore
from blobmount.lru import LRU


def test_a_byte_budget_drops_the_least_recently_used() -> None:
    lru: LRU[str, bytes] = LRU(10, len)
    lru.put("a", b"1234")
    lru.put("b", b"1234")
    assert lru.get("a") == b"1234"  # now b is the oldest
    assert lru.put("c", b"1234") == [("b", b"1234")]
    assert ("a" in lru, "b" in lru, "c" in lru, lru.used) == (True, False, True, 8)


def test_replacing_a_key_counts_its_bytes_once() -> None:
    lru: LRU[str, bytes] = LRU(100, len)
    lru.put("a", b"x" * 40)
    lru.put("a", b"x" * 40)
    assert (len(lru), lru.used) == (1, 40)


def test_the_newest_entry_stays_even_alone_over_the_limit() -> None:
    lru: LRU[str, bytes] = LRU(10, len)
    lru.put("small", b"12")
    assert lru.put("big", b"x" * 50) == [("small", b"12")]
    assert lru.peek("big") is not None


def test_a_count_limit_and_peek_leaves_the_order_alone() -> None:
    lru: LRU[int, str] = LRU(2)
    lru.put(1, "one")
    lru.put(2, "two")
    assert lru.peek(1) == "one"  # not touched: 1 is still the oldest
    assert lru.put(3, "three") == [(1, "one")]
    assert lru.pop(2) == "two"
    assert (len(lru), lru.used) == (1, 1)


def test_the_chunk_memory_tier_keeps_its_byte_budget() -> None:
    store = ChunkStore(None, "ab" * 32, 1 << 20, chunk_size=4096, memory_bytes=3 * 4096)
    for i in range(5):
        store.memory_put(i, bytes(4096))
    assert [store.in_memory(i) for i in range(5)] == [False, False, True, True, True]
    assert store.memory_used == 3 * 4096
    store.forget(4)
    assert store.memory_used == 2 * 4096
