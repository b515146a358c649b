"""Calling the filesystem's handlers without the kernel (tests/fs): a request context, and the
errno a handler answers with."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pyfuse3
import pytest

from tests.support.aio import run

CTX = pyfuse3.RequestContext()


def fuse_errno(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(fn, *args)
    return info.value.errno
