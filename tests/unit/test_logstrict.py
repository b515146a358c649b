"""The guard that fails a test on an undeclared warning (tests/support/logstrict.py) can fail."""

from __future__ import annotations

import logging

import pytest

from tests.support.logstrict import collected, unexpected


def test_an_undeclared_warning_is_reported_and_a_declared_one_is_not() -> None:
    with collected("logstrict.selftest") as records:
        log = logging.getLogger("logstrict.selftest.child")
        log.info("not collected: below WARNING")
        log.warning("disk says no")
        log.error("retry 2 in 0.4 s")
    assert unexpected(records, []) == [
        "WARNING logstrict.selftest.child: disk says no",
        "ERROR logstrict.selftest.child: retry 2 in 0.4 s",
    ]
    assert unexpected(records, [r"retry \d+ in"]) == ["WARNING logstrict.selftest.child: disk says no"]
    assert unexpected(records, [r"^logstrict\.selftest\.child: "]) == []


@pytest.mark.expect_log(r"^blobmount\.selftest: declared$")
def test_a_declared_warning_passes_the_guard() -> None:
    logging.getLogger("blobmount.selftest").warning("declared")
