"""Fixtures of the kernel-free twins: the fault and quirk proxies the mounted twins use
(tests/fuse/conftest.py's), in front of the same session registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.faults import FaultProxy
from tests.support.servers import QuirkProxy, Registry


@pytest.fixture
def quirk_proxy(registry: Registry) -> Iterator[QuirkProxy]:
    """A quirk proxy in front of the session registry (counts requests, plays quirks when told)."""
    p = QuirkProxy(registry.host)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session registry, no fault on (tests switch them per request)."""
    p = FaultProxy(registry.host)
    try:
        yield p
    finally:
        p.stop()
