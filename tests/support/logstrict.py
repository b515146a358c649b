"""The log-strict guard of every test (tests/conftest.py): blobmount's WARNING and ERROR lines
are collected while a test runs, and any its ``expect_log`` patterns do not allow fail it."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def collected(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    """WARNING and above of `logger_name` and its children, whatever else handles them."""
    collect = _Collect()
    logger = logging.getLogger(logger_name)
    logger.addHandler(collect)
    try:
        yield collect.records
    finally:
        logger.removeHandler(collect)


def unexpected(records: Iterable[logging.LogRecord], patterns: Iterable[str]) -> list[str]:
    """The records no pattern allows; a pattern is searched in "logger: message"."""
    allowed = [re.compile(p) for p in patterns]
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in records
        if not any(p.search(f"{r.name}: {r.getMessage()}") for p in allowed)
    ]
