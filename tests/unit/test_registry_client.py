"""Fault paths of the registry client through httpx.MockTransport, on trio's autojump clock so that
backoff and token lifetimes take no wall time. (The real-registry tests are in tests/registry.)"""

from __future__ import annotations

import json
import ssl
import time

import httpx
import pytest
import trio
import trio.testing

from blobmount.errors import AuthError, SourceError, TransientError
from blobmount.reference import Digest, Reference
from blobmount.registry.auth import parse_www_authenticate
from blobmount.registry.client import RegistryClient, RegistryOptions, check_content_range
from blobmount.registry.tokens import SHARED, SharedAuth, SharedTokens
from tests.support.aio import run_virtual
from tests.support.fakes import BLOB, DIGEST, REF, client, ranged


def test_retry_after_is_honoured_then_the_read_succeeds() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "7"})
        if len(calls) == 2:
            return httpx.Response(503)
        return ranged(request)

    async def go() -> bytes:
        c = client(handler)
        try:
            return await c.read_range(DIGEST, 10, 20, len(BLOB))
        finally:
            await c.aclose()

    data, elapsed = run_virtual(go)
    assert data == BLOB[10:20]
    assert len(calls) == 3
    assert elapsed >= 7.0  # waited as told, on the virtual clock
    assert all(r.headers["accept-encoding"] == "identity" for r in calls)


@pytest.mark.expect_log(r"; retry \d+ in ")
def test_transient_failures_end_in_an_error_after_bounded_retries() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("refused")

    async def go() -> bytes:
        c = client(handler)
        try:
            return await c.read_range(DIGEST, 0, 10, len(BLOB))
        finally:
            await c.aclose()

    with pytest.raises(TransientError):
        run_virtual(go)
    assert 2 <= len(calls) <= 40


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (206, {"Content-Range": "bytes 0-9/16384"}, BLOB[:10]),  # wrong range for 10-19
        (206, {"Content-Range": "bytes 10-19/16384"}, BLOB[10:25]),  # body longer than asked
        (206, {"Content-Range": "bytes 10-19/16384"}, BLOB[10:15]),  # truncated body
        (206, {"Content-Range": "garbage"}, BLOB[10:20]),
    ],
)
@pytest.mark.expect_log(r"; retry \d+ in ")
def test_wrong_answers_are_never_returned_as_data(status: int, headers: dict[str, str], body: bytes) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers, content=body)

    async def go() -> bytes:
        c = client(handler)
        try:
            return await c.read_range(DIGEST, 10, 20, len(BLOB))
        finally:
            await c.aclose()

    with pytest.raises(SourceError):
        run_virtual(go)


def test_bearer_token_is_refreshed_before_it_expires_without_a_401() -> None:
    tokens: list[str] = []
    unauthorized = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            tokens.append(f"t{len(tokens)}")
            return httpx.Response(200, content=json.dumps({"token": tokens[-1], "expires_in": 60}))
        if request.headers.get("authorization") != f"Bearer {tokens[-1] if tokens else ''}":
            unauthorized.append(request)
            challenge = 'Bearer realm="https://registry.test:5000/token",service="svc"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return ranged(request)

    async def go() -> list[bytes]:
        c = client(handler)
        try:
            out = [await c.read_range(DIGEST, 0, 5, len(BLOB))]
            await trio.sleep(120)  # past the token's 60 s
            out.append(await c.read_range(DIGEST, 5, 10, len(BLOB)))
            return out
        finally:
            await c.aclose()

    result, _ = run_virtual(go)
    assert result == [BLOB[:5], BLOB[5:10]]
    assert len(tokens) == 2
    assert len(unauthorized) == 1  # only the very first, anonymous request


def test_refused_credentials_are_an_auth_error_without_the_secret() -> None:
    from blobmount.registry.auth import Credentials

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    async def go() -> bytes:
        c = client(handler, credentials=Credentials("u", "hunter2"))
        try:
            return await c.read_range(DIGEST, 0, 5, len(BLOB))
        finally:
            await c.aclose()

    with pytest.raises(AuthError) as info:
        run_virtual(go)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(Credentials("u", "hunter2"))


def test_content_range_checks() -> None:
    check_content_range("bytes 10-19/100", 10, 20, 100)
    check_content_range("bytes 10-19/*", 10, 20, 100)
    for bad in ("bytes 10-18/100", "bytes 10-19/99", "items 10-19/100", "bytes x-y/100", ""):
        with pytest.raises(SourceError):
            check_content_range(bad, 10, 20, 100)


def test_www_authenticate_parsing() -> None:
    (c,) = parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    two = parse_www_authenticate('Basic realm="x", Bearer realm="y"')
    assert [c.scheme for c in two] == ["basic", "bearer"]


def test_plain_http_and_insecure_are_per_host() -> None:
    from blobmount.reference import host_matches

    assert host_matches("mirror.test", "mirror.test:5000")
    assert host_matches("mirror.test:5000", "mirror.test:5000")
    assert not host_matches("mirror.test:5001", "mirror.test:5000")
    assert not host_matches("other.test", "mirror.test")
    c = RegistryClient(REF, RegistryOptions(plain_http=("registry.test",)))
    assert c.base == "http://registry.test:5000"
    c2 = RegistryClient(REF, RegistryOptions(plain_http=("elsewhere.test",)))
    assert c2.base == "https://registry.test:5000"
    local = RegistryClient(Reference.parse("127.0.0.1:5000/a/b"))
    assert local.base.startswith("http://")

    async def close() -> None:
        for x in (c, c2, local):
            await x.aclose()

    trio.run(close)


def test_a_stalled_read_ends_within_the_timeout() -> None:
    """A server that never answers costs one --timeout, not forever (autojump clock: no wall time)."""
    from blobmount.registry.mirrors import Endpoints
    from blobmount.sources.remote import RegistryBlobSource
    from tests.support.registry_reads import read_fetched

    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(10_000)
        raise AssertionError("unreachable")

    async def go() -> bytes:
        source = RegistryBlobSource(REF, RegistryOptions(timeout_s=2.0), DIGEST, len(BLOB))
        origin = RegistryClient(REF, source.options, transport=httpx.MockTransport(handler))
        source._endpoints = Endpoints(REF, source.options, origin=origin)
        try:
            return await read_fetched(source, 0, 10, 2.0)
        finally:
            await source.aclose()

    with pytest.raises(TransientError, match="--timeout 2 s"):
        run_virtual(go)


def _token_server(
    expires_in: int | None, token_status: int = 200, realm: str = "https://auth.test/token"
) -> tuple[object, list[str], list[int]]:
    """A MockTransport handler: a registry demanding bearer tokens and its token endpoint."""
    tokens: list[str] = []
    statuses: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            if token_status != 200:
                return httpx.Response(token_status)
            tokens.append(f"t{len(tokens)}")
            doc: dict[str, object] = {"token": tokens[-1]}
            if expires_in is not None:
                doc["expires_in"] = expires_in
            return httpx.Response(200, content=json.dumps(doc))
        if not tokens or request.headers.get("authorization") != f"Bearer {tokens[-1]}":
            statuses.append(401)
            challenge = f'Bearer realm="{realm}",service="svc"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        statuses.append(206)
        return ranged(request)

    return handler, tokens, statuses


@pytest.mark.expect_log(r"; retry \d+ in ")
def test_a_token_endpoint_that_keeps_failing_is_a_bounded_error_naming_it() -> None:
    handler, _, statuses = _token_server(300, token_status=500)

    async def go() -> bytes:
        c = client(handler)
        try:
            return await c.read_range(DIGEST, 0, 5, len(BLOB))
        finally:
            await c.aclose()

    with pytest.raises(TransientError, match=r"token endpoint auth.test answered 500"):
        run_virtual(go)
    assert 2 <= len(statuses) <= 40


def test_short_lived_tokens_serve_most_of_their_life_without_a_storm() -> None:
    """A 4 s token (shorter than the 10 s margin) is used for 3 s, then replaced before it expires:
    neither a token per request nor a 401 per refresh."""
    handler, tokens, statuses = _token_server(4)

    async def go() -> None:
        c = client(handler)
        try:
            for i in range(16):  # 8 s of reads every 0.5 s
                assert await c.read_range(DIGEST, i, i + 5, len(BLOB)) == BLOB[i : i + 5]
                await trio.sleep(0.5)
        finally:
            await c.aclose()

    run_virtual(go)
    assert statuses.count(401) == 1  # only the first, anonymous request
    assert 3 <= len(tokens) <= 4


def test_clients_of_the_same_options_share_the_token() -> None:
    """The daemon (a fork of the mount's parent) builds new clients from the same options: they
    start with the parent's token instead of a 401 and a token round trip before the first read."""
    handler, tokens, statuses = _token_server(300)

    async def go() -> None:
        options = RegistryOptions()
        for _ in range(3):
            c = RegistryClient(REF, options, transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
            try:
                assert await c.read_range(DIGEST, 0, 5, len(BLOB)) == BLOB[:5]
            finally:
                await c.aclose()
        other = client(handler)  # other options: nothing shared
        try:
            await other.read_range(DIGEST, 0, 5, len(BLOB))
        finally:
            await other.aclose()

    run_virtual(go)
    assert len(tokens) == 2
    assert statuses == [401, 206, 206, 206, 401, 206]
    assert "Bearer" not in repr(RegistryOptions()) + repr(SHARED)  # neither shows a token


def test_options_share_auth_by_key_not_by_equality() -> None:
    """Equal options built apart (two CLI calls in one process) keep their tokens apart; a copy
    made with dataclasses.replace (the Python API's per-call changes) shares them. The options
    hold only the key: they stay an immutable value."""
    import dataclasses

    a, b = RegistryOptions(), RegistryOptions()
    assert a == b
    assert a.auth_share != b.auth_share
    assert dataclasses.replace(a, timeout_s=5.0).auth_share == a.auth_share
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.auth_share = "x"  # type: ignore[misc]


def test_the_shared_token_store_is_bounded() -> None:
    store = SharedTokens(max_entries=3)
    for i in range(5):
        store.put((str(i), "https://r.test", "pull"), SharedAuth(basic=True))
    assert store.get(("0", "https://r.test", "pull")) is None
    assert store.get(("1", "https://r.test", "pull")) is None
    assert store.get(("4", "https://r.test", "pull")) == SharedAuth(basic=True)
    assert "3 entries" in repr(store)


def test_a_shared_challenge_fetches_a_fresh_token_without_a_401() -> None:
    handler, tokens, statuses = _token_server(1)  # a token lives 1 s of real time

    async def go() -> None:
        options = RegistryOptions()
        first = RegistryClient(REF, options, transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
        await first.read_range(DIGEST, 0, 5, len(BLOB))
        await first.aclose()
        await trio.to_thread.run_sync(time.sleep, 1.1)  # the shared entry uses the monotonic clock
        second = RegistryClient(REF, options, transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
        await second.read_range(DIGEST, 0, 5, len(BLOB))
        await second.aclose()

    trio.run(go)
    assert len(tokens) == 2
    assert statuses == [401, 206, 206]


def test_a_plain_http_registry_costs_no_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    from blobmount.registry import transport as client_module

    built: list[str | None] = []
    real = client_module.tls_context

    def counting(ca_file: str | None) -> ssl.SSLContext:
        built.append(ca_file)
        return real(ca_file)

    monkeypatch.setattr(client_module, "tls_context", counting)

    async def go() -> None:
        local = RegistryClient(Reference.parse("127.0.0.1:5000/a/b"), transport=httpx.MockTransport(ranged))
        await local.read_range(DIGEST, 0, 5, len(BLOB))
        await local.aclose()
        assert built == []
        # a token realm on another host over plain HTTP needs no TLS context either
        handler, tokens, _ = _token_server(300, realm="http://auth.test/token")
        plain_realm = RegistryClient(Reference.parse("127.0.0.1:5000/a/b"), transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
        await plain_realm.read_range(DIGEST, 0, 5, len(BLOB))
        await plain_realm.aclose()
        assert tokens
        assert built == []
        remote = RegistryClient(REF, transport=httpx.MockTransport(ranged))
        await remote.read_range(DIGEST, 0, 5, len(BLOB))
        await remote.aclose()
        assert built == [None]

    trio.run(go)


@pytest.mark.expect_log(r"; retry \d+ in ")
def test_an_open_that_runs_out_of_time_names_what_it_was_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry answering 503 to everything: the one-line error says so, not only "no answer"."""
    from blobmount.registry import mirrors
    from blobmount.sources import remote as source

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    def endpoints(ref: Reference, options: RegistryOptions) -> mirrors.Endpoints:
        origin = RegistryClient(ref, options, transport=httpx.MockTransport(handler), max_attempts=1000)
        return mirrors.Endpoints(ref, options, origin=origin)

    monkeypatch.setattr(source, "Endpoints", endpoints)

    async def go() -> None:
        await source.open_registry(str(REF), RegistryOptions(timeout_s=2.0))

    with pytest.raises(SourceError) as err:
        run_virtual(go)
    message = str(err.value)
    assert "did not answer within 8 s" in message
    assert "answered 503" in message


@pytest.mark.parametrize("plain_http", [(), ("auth.test",)])
def test_credentials_never_go_to_a_plain_http_realm_unless_named(plain_http: tuple[str, ...]) -> None:
    from blobmount.registry.auth import Credentials

    token_requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            token_requests.append(request)
            return httpx.Response(200, json={"token": "t"})
        if request.headers.get("authorization") != "Bearer t":
            challenge = 'Bearer realm="http://auth.test/token",service="registry.test"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return ranged(request)

    async def go() -> bytes:
        c = client(handler, credentials=Credentials("u", "hunter2"), plain_http=plain_http)
        try:
            return await c.read_range(DIGEST, 0, 5, len(BLOB))
        finally:
            await c.aclose()

    if plain_http:
        assert run_virtual(go)[0] == BLOB[:5]
        assert token_requests[0].headers["authorization"].startswith("Basic ")
    else:
        with pytest.raises(AuthError, match="plain http://: refusing to send credentials"):
            run_virtual(go)
        assert token_requests == []


@pytest.mark.parametrize(
    ("status", "header", "expected"),
    [
        (304, None, None),  # the registry honours If-None-Match
        (200, str(DIGEST), None),  # it does not (docker-registry): the digest header says unchanged
        (200, "sha256:" + "1" * 64, Digest.parse("sha256:" + "1" * 64)),
    ],
)
def test_resolve_changed_sends_a_conditional_head(status: int, header: str | None, expected: Digest | None) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, headers={"Docker-Content-Digest": header} if header else {})

    async def go() -> Digest | None:
        c = client(handler)
        try:
            return await c.resolve_changed(DIGEST)
        finally:
            await c.aclose()

    result, _ = run_virtual(go)
    assert result == expected
    assert [r.method for r in seen] == ["HEAD"]
    assert seen[0].headers["if-none-match"] == f'"{DIGEST}"'
    assert seen[0].url.path == "/v2/team/assets/manifests/v3"
