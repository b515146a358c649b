"""Test-wide guards. No test may resolve a name that is not local: this machine's resolver is
off-limits, and a test that reaches out is a bug (it would also hang or flake)."""

from __future__ import annotations

import functools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from blobmount.reference import Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support.helpers import FIXTURE_NAMES, FIXTURES, REFERENCE_CREATED
from tests.support.servers import Registry, start_registry

_LOCAL = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
_real_getaddrinfo = socket.getaddrinfo


def _guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and name not in _LOCAL and not str(name).startswith("127."):
        raise AssertionError(f"test tried to resolve non-local name {name!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def _no_remote_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _guarded_getaddrinfo)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous docker-registry for the whole session."""
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[Registry]:
    """An anonymous docker-registry of this test's own, which the test may stop (`.stop()`) to
    take the registry away while its address stays the same (a cache is keyed by it)."""
    reg = start_registry(tmp_path / "own-registry")
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def pushed(registry: Registry) -> dict[str, str]:
    """Every go-reference fixture pushed as is (its own blobs, the reference's manifest shape):
    name -> tag reference on the session registry."""
    refs: dict[str, str] = {}
    for name in FIXTURE_NAMES:
        ref = Reference.parse(f"{registry.host}/fixtures/{name}:v1")
        digest = trio.run(
            functools.partial(push_archive, FIXTURES / name, ref, RegistryOptions(), created=REFERENCE_CREATED)
        )
        refs[name] = str(ref)
        refs[name + "@"] = f"{registry.host}/fixtures/{name}@{digest}"
    return refs
