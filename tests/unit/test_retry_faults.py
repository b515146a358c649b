"""Retry and backoff under every network fault, through httpx.MockTransport on trio's autojump
clock: how many attempts, how long (virtual seconds), what error, and that nothing sticks once the
fault clears. The mounted counterparts are tests/fuse/test_network_faults.py."""

from __future__ import annotations

import itertools
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import trio
import trio.testing

from blobmount.errors import AuthError, SourceError, TransientError
from blobmount.reference import Digest, Reference
from blobmount.registry import client as client_mod
from blobmount.registry import retry as retry_mod
from blobmount.registry.client import RegistryClient, RegistryOptions
from blobmount.registry.mirrors import Endpoints
from blobmount.sources.remote import RegistryBlobSource
from tests.support import resolver
from tests.support.aio import run_virtual
from tests.support.registry_reads import read_fetched

BLOB = bytes(range(256)) * 256
DIGEST = Digest.of(BLOB)
REF = Reference.parse("registry.test:5000/team/assets:v3")
T = TypeVar("T")
Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def ranged(request: httpx.Request) -> httpx.Response:
    first, last = (int(x) for x in request.headers["range"].removeprefix("bytes=").split("-"))
    headers = {"Content-Range": f"bytes {first}-{last}/{len(BLOB)}"}
    return httpx.Response(206, headers=headers, content=BLOB[first : last + 1])


class BrokenStream(httpx.AsyncByteStream):
    """A body that yields `head` and then fails the way a reset connection does."""

    def __init__(self, head: bytes, exc: Exception) -> None:
        self.head = head
        self.exc = exc

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        raise self.exc


run = run_virtual


def run_failing(fn: Callable[[], Awaitable[object]]) -> tuple[BaseException, float]:
    """Like :func:`run` for a call that must fail: the exception and the virtual seconds taken."""

    async def go() -> tuple[BaseException, float]:
        start = trio.current_time()
        try:
            await fn()
        except Exception as exc:
            return exc, trio.current_time() - start
        raise AssertionError("the call succeeded")

    return run(go)[0]


def read_once(handler: Handler, start: int = 0, end: int = 100, **options: object) -> Callable[[], Awaitable[bytes]]:
    async def go() -> bytes:
        c = RegistryClient(REF, RegistryOptions(**options), transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
        try:
            return await c.read_range(DIGEST, start, end, len(BLOB))
        finally:
            await c.aclose()

    return go


def read_via_source(
    handler: Handler, timeout_s: float, start: int = 0, end: int = 100
) -> Callable[[], Awaitable[bytes]]:
    """Through the fetcher over RegistryBlobSource, whose --timeout bounds the whole read across retries."""

    async def go() -> bytes:
        source = RegistryBlobSource(REF, RegistryOptions(timeout_s=timeout_s), DIGEST, len(BLOB))
        origin = RegistryClient(REF, source.options, transport=httpx.MockTransport(handler))
        source._endpoints = Endpoints(REF, source.options, origin=origin)
        try:
            return await read_fetched(source, start, end, timeout_s)
        finally:
            await source.aclose()

    return go


def failing_first(n: int, fail: Callable[[httpx.Request], httpx.Response], calls: list[float]) -> Handler:
    """A server that fails the first `n` requests with `fail`, then answers ranges correctly."""

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(trio.current_time())
        if len(calls) <= n:
            return fail(request)
        return ranged(request)

    return handler


def _raise(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc

    return fail


# Every transient fault the client must retry, as a MockTransport answer.
TRANSIENT: dict[str, Callable[[httpx.Request], httpx.Response]] = {
    "connection refused": _raise(httpx.ConnectError("[Errno 111] Connection refused")),
    "dns failure": _raise(httpx.ConnectError("[Errno -3] Temporary failure in name resolution")),
    "connect timeout": _raise(httpx.ConnectTimeout("timed out")),
    "read timeout (stall)": _raise(httpx.ReadTimeout("timed out")),
    "closed without answer": _raise(httpx.RemoteProtocolError("Server disconnected without sending a response.")),
    "500": lambda r: httpx.Response(500),
    "502": lambda r: httpx.Response(502),
    "503": lambda r: httpx.Response(503),
    "504": lambda r: httpx.Response(504),
    "429": lambda r: httpx.Response(429),
    "reset mid-body": lambda r: httpx.Response(
        206,
        headers={"Content-Range": f"bytes 0-99/{len(BLOB)}"},
        stream=BrokenStream(BLOB[:50], httpx.ReadError("[Errno 104] Connection reset by peer")),
    ),
    "truncated body": lambda r: httpx.Response(
        206, headers={"Content-Range": f"bytes 0-99/{len(BLOB)}"}, content=BLOB[:60]
    ),
    "body longer than asked": lambda r: httpx.Response(
        206, headers={"Content-Range": f"bytes 0-99/{len(BLOB)}"}, content=BLOB[:150]
    ),
    "wrong Content-Range": lambda r: httpx.Response(
        206, headers={"Content-Range": f"bytes 1-100/{len(BLOB)}"}, content=BLOB[1:101]
    ),
}


@pytest.mark.parametrize("fault", list(TRANSIENT))
def test_a_brief_fault_is_retried_and_the_bytes_are_right(fault: str) -> None:
    calls: list[float] = []
    data, elapsed = run(read_once(failing_first(2, TRANSIENT[fault], calls)))
    assert data == BLOB[:100]
    assert len(calls) == 3
    # backoff: attempt k waits 0.2 * 2^(k-1) s with jitter in [0.5, 1.5)
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert 0.1 <= gaps[0] < 0.3
    assert 0.2 <= gaps[1] < 0.6
    assert elapsed < 1.0


@pytest.mark.parametrize("fault", list(TRANSIENT))
@pytest.mark.expect_log(r"; retry \d+ in ")
def test_a_lasting_fault_ends_in_a_transient_error_after_bounded_attempts(fault: str) -> None:
    calls: list[float] = []
    with pytest.raises(TransientError):
        run(read_once(failing_first(10_000, TRANSIENT[fault], calls)))
    assert len(calls) == retry_mod.MAX_ATTEMPTS
    waits = [min(retry_mod.BACKOFF_MAX_S, retry_mod.BACKOFF_FIRST_S * 2**k) for k in range(retry_mod.MAX_ATTEMPTS - 1)]
    assert 0.5 * sum(waits) <= calls[-1] - calls[0] < 1.5 * sum(waits)


@pytest.mark.parametrize("fault", list(TRANSIENT))
@pytest.mark.expect_log(r"; retry \d+ in ")
def test_the_timeout_bounds_a_read_whatever_the_fault(fault: str) -> None:
    """Through the data source: --timeout 2 ends the read at 2 s (virtual), never later."""
    calls: list[float] = []
    exc, elapsed = run_failing(read_via_source(failing_first(10_000, TRANSIENT[fault], calls), timeout_s=2.0))
    assert isinstance(exc, TransientError)
    assert "--timeout 2 s" in str(exc)
    assert elapsed == pytest.approx(2.0)
    assert len(calls) >= 2  # retried within the budget


def test_retry_after_longer_than_the_timeout_still_ends_at_the_timeout() -> None:
    calls: list[float] = []
    handler = failing_first(10_000, lambda r: httpx.Response(429, headers={"Retry-After": "3600"}), calls)
    exc, elapsed = run_failing(read_via_source(handler, timeout_s=2.0))
    assert isinstance(exc, TransientError)
    assert elapsed == pytest.approx(2.0)
    assert len(calls) == 1  # asked to wait an hour: waited (within the budget), not hammered


def test_retry_after_is_waited_when_it_fits() -> None:
    calls: list[float] = []
    handler = failing_first(1, lambda r: httpx.Response(503, headers={"Retry-After": "4"}), calls)
    data, _ = run(read_via_source(handler, timeout_s=30.0))
    assert data == BLOB[:100]
    assert calls[1] - calls[0] >= 4.0


def test_a_stall_mid_body_ends_at_the_timeout() -> None:
    """Headers arrive, then the body stops: the read ends at --timeout, not at the next byte."""

    class Stalling(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield BLOB[:10]
            await trio.sleep(10_000)
            yield BLOB[10:100]  # pragma: no cover

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, headers={"Content-Range": f"bytes 0-99/{len(BLOB)}"}, stream=Stalling())

    exc, elapsed = run_failing(read_via_source(handler, timeout_s=2.0))
    assert isinstance(exc, TransientError)
    assert "--timeout 2 s" in str(exc)
    assert elapsed == pytest.approx(2.0)


def test_slow_drip_ends_at_the_timeout() -> None:
    """1 KiB/s never trips a per-read socket timeout; the total budget ends it."""

    class Drip(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for pos in range(0, 8192, 1024):
                await trio.sleep(1.0)
                yield BLOB[pos : pos + 1024]

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, headers={"Content-Range": f"bytes 0-8191/{len(BLOB)}"}, stream=Drip())

    exc, elapsed = run_failing(read_via_source(handler, timeout_s=2.0, end=8192))
    assert isinstance(exc, TransientError)
    assert elapsed == pytest.approx(2.0)


# Answers that retrying cannot fix: one request, one clear error.
FINAL: dict[str, tuple[Callable[[httpx.Request], httpx.Response], type[Exception], str]] = {
    "404": (lambda r: httpx.Response(404), SourceError, "not found"),
    "416": (lambda r: httpx.Response(416), SourceError, "outside blob"),
    "403": (lambda r: httpx.Response(403), AuthError, "access denied"),
    "200 for a range": (lambda r: httpx.Response(200, content=BLOB), SourceError, "whole blob"),
    "418": (lambda r: httpx.Response(418), SourceError, "answered 418"),
    "blob size unlike its descriptor": (
        lambda r: httpx.Response(206, headers={"Content-Range": "bytes 10-19/7"}, content=BLOB[10:20]),
        SourceError,
        "descriptor says",
    ),
}


@pytest.mark.parametrize("answer", list(FINAL))
def test_final_answers_are_not_retried(answer: str) -> None:
    fail, exc_type, phrase = FINAL[answer]
    calls: list[float] = []
    with pytest.raises(exc_type, match=phrase) as info:
        run(read_once(failing_first(10_000, fail, calls), start=10, end=20))
    assert not isinstance(info.value, TransientError)
    assert len(calls) == 1


def test_a_redirect_loop_is_cut_and_not_retried() -> None:
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(307, headers={"Location": str(request.url)})

    with pytest.raises(SourceError, match="more than 5 redirects"):
        run(read_once(handler))
    assert len(calls) == client_mod.MAX_REDIRECTS + 1


def test_a_redirect_loop_through_storage_is_cut_too() -> None:
    """registry -> storage A -> storage B -> storage A ...: each hop is counted."""
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        nxt = "https://b.storage.test/x" if request.url.host != "b.storage.test" else "https://a.storage.test/x"
        return httpx.Response(302, headers={"Location": nxt})

    with pytest.raises(SourceError, match="redirects"):
        run(read_once(handler))
    assert len(calls) <= client_mod.MAX_REDIRECTS + 1


def test_storage_url_that_starts_failing_is_dropped_and_re_resolved() -> None:
    """A presigned URL that expires early (403/5xx) must not poison later reads of the blob."""
    log: list[str] = []
    storage_ok = [True]

    async def handler(request: httpx.Request) -> httpx.Response:
        log.append(request.url.host)
        if request.url.host == "registry.test":
            return httpx.Response(307, headers={"Location": f"https://storage.test/b?sig={len(log)}"})
        if not storage_ok[0] and request.url.params.get("sig") == "1":
            return httpx.Response(403)
        return ranged(request)

    async def go() -> list[bytes]:
        c = RegistryClient(REF, transport=httpx.MockTransport(handler))
        try:
            out = [await c.read_range(DIGEST, 0, 10, len(BLOB))]
            storage_ok[0] = False  # the first URL is now refused
            out.append(await c.read_range(DIGEST, 10, 20, len(BLOB)))
            out.append(await c.read_range(DIGEST, 20, 30, len(BLOB)))
            return out
        finally:
            await c.aclose()

    result, _ = run(go)
    assert result == [BLOB[:10], BLOB[10:20], BLOB[20:30]]
    assert log.count("registry.test") == 2  # resolved again once, then the new URL reused


def _bearer_server(
    token_fail: Callable[[int], httpx.Response | None], lifetime_s: int = 60
) -> tuple[Handler, dict[str, int]]:
    """A registry demanding bearer tokens; `token_fail(n)` may answer the n-th token request."""
    counts = {"token": 0, "blob": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            counts["token"] += 1
            failed = token_fail(counts["token"])
            if failed is not None:
                return failed
            return httpx.Response(200, content=json.dumps({"token": f"t{counts['token']}", "expires_in": lifetime_s}))
        counts["blob"] += 1
        if not request.headers.get("authorization", "").startswith("Bearer t"):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://registry.test:5000/token"'})
        return ranged(request)

    return handler, counts


@pytest.mark.parametrize(
    "failure",
    [
        lambda r: httpx.Response(500),
        lambda r: httpx.Response(503, headers={"Retry-After": "1"}),
        _raise(httpx.ConnectError("token host refused")),
        _raise(httpx.ReadTimeout("token host stalled")),
    ],
    ids=["500", "503-retry-after", "refused", "stall"],
)
def test_a_token_endpoint_failing_briefly_is_retried(failure: Callable[[httpx.Request], httpx.Response]) -> None:
    handler, counts = _bearer_server(lambda n: failure(httpx.Request("GET", "https://x/")) if n <= 2 else None)
    data, _ = run(read_once(handler))
    assert data == BLOB[:100]
    assert counts["token"] == 3


@pytest.mark.expect_log(r"; retry \d+ in ")
def test_a_token_endpoint_down_ends_at_the_timeout_and_recovers() -> None:
    down = [True]
    handler, _ = _bearer_server(lambda n: httpx.Response(502) if down[0] else None)

    async def go() -> bytes:
        source = RegistryBlobSource(REF, RegistryOptions(timeout_s=2.0), DIGEST, len(BLOB))
        origin = RegistryClient(REF, source.options, transport=httpx.MockTransport(handler))
        source._endpoints = Endpoints(REF, source.options, origin=origin)
        try:
            with pytest.raises(TransientError):
                await read_fetched(source, 0, 10, 2.0)
            down[0] = False
            return await read_fetched(source, 0, 10, 2.0)
        finally:
            await source.aclose()

    data, elapsed = run(go)
    assert data == BLOB[:10]
    assert 2.0 <= elapsed < 2.5


def test_a_token_endpoint_refusing_is_an_auth_error_at_once() -> None:
    handler, counts = _bearer_server(lambda n: httpx.Response(401))
    with pytest.raises(AuthError, match="refused"):
        run(read_once(handler))
    assert counts["token"] == 1


def test_many_readers_share_one_token_refresh_through_a_brief_outage() -> None:
    """32 reads in flight when the token expires and the endpoint fails twice: one refresh at a
    time, every read ends with the right bytes."""
    handler, counts = _bearer_server(lambda n: httpx.Response(503) if n in (2, 3) else None, lifetime_s=15)

    async def go() -> list[bytes]:
        c = RegistryClient(REF, RegistryOptions(), transport=httpx.MockTransport(handler))
        out: list[bytes] = [b""] * 32
        try:
            await c.read_range(DIGEST, 0, 1, len(BLOB))
            await trio.sleep(12)  # past its refresh point (a quarter of its life before expiry)

            async def one(i: int) -> None:
                out[i] = await c.read_range(DIGEST, i * 100, i * 100 + 100, len(BLOB))

            async with trio.open_nursery() as nursery:
                for i in range(32):
                    nursery.start_soon(one, i)
            return out
        finally:
            await c.aclose()

    result, _ = run(go)
    assert result == [BLOB[i * 100 : i * 100 + 100] for i in range(32)]
    assert counts["token"] == 4  # the first, two failures, one success: not one per reader


@pytest.mark.expect_log(r"; retry \d+ in ")
def test_retry_logs_escalate_from_debug_to_warning(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []
    with caplog.at_level(logging.DEBUG, logger="blobmount"):
        run(read_once(failing_first(4, lambda r: httpx.Response(503), calls)))
    levels = [r.levelno for r in caplog.records if "retry" in r.getMessage()]
    assert levels == [logging.DEBUG, logging.DEBUG, logging.WARNING, logging.WARNING]


def test_dns_failure_through_the_real_transport(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MockTransport: httpx and trio resolve through the injected resolver, which fails like a
    dead DNS server. The error is transient (retried), names the failure, and no real lookup runs."""
    flag = tmp_path / "dns-down"
    flag.touch()
    asked: list[str] = []
    inner = resolver.resolver(flag, socket.getaddrinfo)

    def counting(host: object, *args: object, **kwargs: object) -> object:
        asked.append(host.decode() if isinstance(host, bytes) else str(host))
        return inner(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    ref = Reference.parse("registry.faults.test:5000/team/assets:v1")

    async def go() -> bytes:
        c = RegistryClient(ref, RegistryOptions(plain_http=("registry.faults.test:5000",)), max_attempts=2)
        try:
            return await c.read_range(DIGEST, 0, 10, len(BLOB))
        finally:
            await c.aclose()

    with pytest.raises(TransientError, match=r"ConnectError|gaierror") as info:  # httpx or the fast path
        trio.run(go)
    assert "name resolution" in str(info.value)
    assert set(asked) == {"registry.faults.test"}  # only the injected resolver was asked
    assert 2 <= len(asked) <= 4  # each of the two attempts (trio may probe numeric-only first)


@pytest.mark.expect_log(r"; retry \d+ in ", r"^blobmount\.fetch: data blob bytes .*GET answered 503")
def test_a_lasting_503_costs_max_attempts_requests_for_a_cold_read() -> None:
    """The README's count is what happens: a data read through the fetcher against a registry that
    answers 503 forever sends exactly MAX_ATTEMPTS range requests (the fetcher's loop is the only
    one; the client below it makes one attempt per call). Before, the client's 6 attempts ran
    inside the fetcher's 3: 18 requests."""
    from blobmount.cache import ChunkStore
    from blobmount.fetch import ChunkedSource

    blob = bytes(range(256)) * 64
    digest = Digest.of(blob)
    ref = Reference.parse("registry.faults.test:5000/team/assets:v1")
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("range", ""))
        return httpx.Response(503)

    async def go() -> None:
        options = RegistryOptions(plain_http=("registry.faults.test:5000",), timeout_s=1000.0)
        remote = RegistryBlobSource(ref, options, digest, len(blob))
        origin = RegistryClient(ref, options, transport=httpx.MockTransport(handler))
        remote._endpoints = Endpoints(ref, options, origin=origin)
        source = ChunkedSource(remote, ChunkStore(None, digest.hex, len(blob), 4096), timeout_s=1000.0)
        async with source.serving():
            with pytest.raises(TransientError):
                await source.read_range(0, 100)
        await remote.aclose()

    trio.run(go, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(calls) == retry_mod.MAX_ATTEMPTS
