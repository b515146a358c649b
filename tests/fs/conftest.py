"""The kernel-free twins' one quirk: the warning filter below (their proxies, quirk_proxy and
fault_proxy, are tests/conftest.py's, as the mounted twins' are)."""

from __future__ import annotations

from pathlib import Path

import pytest

# A response body's async generator that a cancelled fetch left in a reference cycle is finalized by
# trio only if the cycle is collected inside the trio run that iterated it. A daemon has one run for
# its life; the kernel-free tests have one per test, so such a generator can be collected in a later
# test's run (serving() collects at its end, which catches most, not all) and trio warns there, in a
# test that has nothing to do with it. Only that warning is let through, only under tests/fs; every
# other unraisable exception still fails the test it happens in (pyproject: filterwarnings error).
_ASYNCGEN_GC = "ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.filterwarnings(_ASYNCGEN_GC))
