"""The API's I/O thread: one trio loop on a daemon thread holding the archive's data source, its
reader and their nursery, and the crossing to it from plain code (``call``) and from another
event loop (:func:`in_worker`, trio or asyncio). See the package docstring for why."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from blobmount.errors import SourceError

if TYPE_CHECKING:
    import trio

    from blobmount.cache import CacheDir
    from blobmount.reader import Reader
    from blobmount.sources.base import Archive as OpenedSource

_P = ParamSpec("_P")
_T = TypeVar("_T")
START_TIMEOUT_S = 30.0  # hang guard for the engine thread's start (it only builds objects)


class Engine:
    """One trio loop on a daemon thread: the archive's data source, reader and their nursery."""

    def __init__(self, opened: OpenedSource, cache: CacheDir | None, verify: str, verify_threshold: int) -> None:
        self._opened = opened
        self._cache = cache
        self._verify = verify
        self._threshold = verify_threshold
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.reader: Reader | None = None
        self._thread = threading.Thread(target=self._run, name="blobmount-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise SourceError("the archive's I/O thread did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        import trio

        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by __init__ when it happens before ready
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        import contextlib
        import tempfile

        import trio

        from blobmount.cache import ContentStore
        from blobmount.reader import Reader, ReaderConfig
        from blobmount.sources.base import Fetching

        data = self._opened.data
        with contextlib.ExitStack() as sync_stack:
            if self._cache is not None:
                store = ContentStore(self._cache)
            else:  # no cache directory: decoded files live in a private temp dir for our life
                tmp = sync_stack.enter_context(tempfile.TemporaryDirectory(prefix="blobmount-api-"))
                os.chmod(tmp, 0o700)
                store = ContentStore(Path(tmp), max_bytes=1 << 62)
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if isinstance(data, Fetching):
                        await stack.enter_async_context(data.serving())
                    nursery = await stack.enter_async_context(trio.open_nursery())
                    reader = Reader(data, store, ReaderConfig(self._verify, self._threshold))  # type: ignore[arg-type]
                    reader.attach(nursery)
                    self.reader = reader
                    self._stop = trio.Event()
                    self._token = trio.lowlevel.current_trio_token()
                    self._ready.set()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await data.aclose()
                data.close()

    def call(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        import trio

        if self._token is None or not self._thread.is_alive():
            raise SourceError("the archive is closed")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        import trio

        if self._token is not None and self._stop is not None and self._thread.is_alive():
            stop = self._stop
            trio.from_thread.run_sync(stop.set, trio_token=self._token)
            self._thread.join(START_TIMEOUT_S)
        self._token = None


async def in_worker(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run a blocking call off the caller's event loop, whichever it is (trio or asyncio)."""
    import sniffio

    call = functools.partial(fn, *args, **kwargs)
    if sniffio.current_async_library() == "trio":
        import trio

        return await trio.to_thread.run_sync(call)
    return await asyncio.get_running_loop().run_in_executor(None, call)
