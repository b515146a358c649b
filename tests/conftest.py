"""Test-wide guards. No test may resolve a name that is not local: this machine's resolver is
off-limits, and a test that reaches out is a bug (it would also hang or flake)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

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
