"""Test-wide guards. No test may resolve a name that is not local: this machine's resolver is
off-limits, and a test that reaches out is a bug (it would also hang or flake). No test may log a
warning or an error it did not declare (``@pytest.mark.expect_log("regex", ...)``, searched in
"logger: message"): a new warning
is news, and a test that passes while the code complains hides a fault."""

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
from tests.support.faults import FaultProxy
from tests.support.helpers import FIXTURE_NAMES, FIXTURES, REFERENCE_CREATED
from tests.support.logstrict import collected, unexpected
from tests.support.servers import QuirkProxy, Registry, start_registry

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


@pytest.fixture(autouse=True)
def _log_strict(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test on a WARNING or ERROR line of blobmount's loggers (in this process) that no
    ``expect_log`` pattern of the test allows. Daemons are processes of their own: their lines are
    checked by the tests that read them."""
    patterns = [p for mark in request.node.iter_markers("expect_log") for p in mark.args]
    with collected("blobmount") as records:
        yield
    lines = unexpected(records, patterns)
    if lines:
        pytest.fail("unexpected log lines (declare them with @pytest.mark.expect_log):\n" + "\n".join(lines))


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


@pytest.fixture
def quirk_proxy(registry: Registry) -> Iterator[QuirkProxy]:
    """A quirk proxy in front of the session registry: it counts what the client asks for
    (requests, ranges, body bytes) and plays registry quirks when told to."""
    p = QuirkProxy(registry.host)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def fault_proxy(registry: Registry) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session registry, no fault on (tests switch them per request)."""
    p = FaultProxy(registry.host)
    try:
        yield p
    finally:
        p.stop()
