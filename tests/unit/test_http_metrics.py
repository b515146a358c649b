"""The registry client's metrics (counted in _send and _backoff only) and its retry log levels:
a retry is DEBUG until it repeats, then WARNING. MockTransport + autojump clock: no wall time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from blobmount.daemon import metrics
from tests.support.aio import run_virtual
from tests.support.fakes import BLOB, DIGEST, client, ranged


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


async def streamed(body: bytes) -> AsyncIterator[bytes]:
    """A body httpx must read as a stream, as from a socket (bytes content is read eagerly)."""
    for i in range(0, len(body), 300):
        yield body[i : i + 300]


def test_requests_bytes_retries_and_in_flight_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ConnectError("reset", request=request)
        if calls == 2:
            return httpx.Response(503)
        answer = ranged(request)
        return httpx.Response(206, headers=answer.headers, content=streamed(answer.content))

    async def go() -> bytes:
        c = client(handler)
        try:
            return await c.read_range(DIGEST, 100, 1100, len(BLOB))
        finally:
            await c.aclose()

    caplog.set_level(logging.DEBUG, logger="blobmount.registry.client")
    body, _ = run_virtual(go)
    assert body == BLOB[100:1100]
    assert metrics.HTTP_REQUESTS.value(kind="range", code="error") == 1
    assert metrics.HTTP_REQUESTS.value(kind="range", code="503") == 1
    assert metrics.HTTP_REQUESTS.value(kind="range", code="206") == 1
    assert metrics.HTTP_BYTES.value(kind="range") == 1000
    assert metrics.HTTP_RETRIES.value() == 2
    assert metrics.HTTP_IN_FLIGHT.value() == 0  # every response body was closed
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.DEBUG, logging.DEBUG]


@pytest.mark.expect_log(r"; retry \d+ in ")
def test_a_retry_escalates_to_warning_when_it_repeats(caplog: pytest.LogCaptureFixture) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    async def go() -> None:
        c = client(handler)
        try:
            await c.read_range(DIGEST, 0, 10, len(BLOB))
        finally:
            await c.aclose()

    caplog.set_level(logging.DEBUG, logger="blobmount.registry.client")
    with pytest.raises(Exception, match="503"):
        run_virtual(go)
    levels = [r.levelno for r in caplog.records if "retry" in r.getMessage()]
    assert levels[:2] == [logging.DEBUG, logging.DEBUG]
    # escalated once it repeated, and stays escalated (the range read's own retry loop around the
    # request's loop restarts its attempt count, not the streak)
    assert levels[2:]
    assert all(level == logging.WARNING for level in levels[2:])
    assert metrics.HTTP_RETRIES.value() == len(levels)
    assert metrics.HTTP_IN_FLIGHT.value() == 0
