"""Registry variants for tests/registry: a docker-registry that trusts a token issuer's JWTs."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from blobmount.reference import Reference
from blobmount.registry.auth import Credentials
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support.faults import FaultProxy
from tests.support.helpers import FIXTURES
from tests.support.servers import (
    TOKEN_PASSWORD,
    TOKEN_USER,
    QuirkProxy,
    Registry,
    SigningKey,
    TokenIssuer,
    start_registry,
)

TOKEN_PUSHED = ("basic", "mixed")


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return SigningKey.create(tmp_path_factory.mktemp("issuer-key"))


@pytest.fixture(scope="session")
def _token_registry(tmp_path_factory: pytest.TempPathFactory, signing_key: SigningKey) -> Iterator[Registry]:
    issuer = TokenIssuer(signing_key)
    issuer.state.users[TOKEN_USER] = TOKEN_PASSWORD
    try:
        reg = start_registry(tmp_path_factory.mktemp("token-registry"), token=issuer, access_log=True)
        try:
            options = RegistryOptions(credentials=Credentials(TOKEN_USER, TOKEN_PASSWORD))
            for name in TOKEN_PUSHED:
                ref = Reference.parse(f"{reg.host}/tok/{name}:v1")
                trio.run(functools.partial(push_archive, FIXTURES / name, ref, options, created="2024-01-02T03:04:05Z"))
            yield reg
        finally:
            reg.stop()
    finally:
        issuer.stop()


@pytest.fixture
def token_registry(_token_registry: Registry) -> Iterator[Registry]:
    """docker-registry with `auth: token` (fixtures basic and mixed pushed as tok/NAME:v1); the
    issuer's behaviour is reset for every test."""
    assert _token_registry.token is not None
    _token_registry.token.reset()
    try:
        yield _token_registry
    finally:
        _token_registry.token.reset()


@pytest.fixture
def fault_proxy(registry: Registry, pushed: dict[str, str]) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session registry (the fixtures pushed), no fault on: tests
    switch faults on per request."""
    p = FaultProxy(registry.host)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def quirk_proxy(registry: Registry, pushed: dict[str, str]) -> Iterator[QuirkProxy]:
    """A quirk proxy in front of the session registry (the fixtures pushed)."""
    p = QuirkProxy(registry.host)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[Registry]:
    """docker-registry with htpasswd basic auth: alice / "s3cret pass"."""
    reg = start_registry(tmp_path / "authreg", user="alice", password="s3cret pass")
    try:
        yield reg
    finally:
        reg.stop()
