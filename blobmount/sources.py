"""SOURCE string -> opened :class:`~blobmount.source.Archive`, local or remote (DESIGN §8).

`oci:PATH[:TAG]`, `dir:PATH` and paths starting with `/`, `./`, `../` are local; anything else is a
registry reference. Kept apart from source.py so that the local sources never import registry/.

Importing this module is cheap on purpose (the heavy imports happen inside the functions): the
mount starts :class:`Opening` first thing, so that the registry's round trips overlap with the
imports only the daemon needs (pyfuse3, the reader, the caches).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from blobmount.registry.options import RegistryOptions

if TYPE_CHECKING:
    from blobmount.source import Archive

HEAD_START_WAIT_S = 10.0  # hang guard only: the opener's imports take ~0.1 s


def is_local(spec: str) -> bool:
    from blobmount.source import is_local_path

    return spec.startswith(("oci:", "dir:")) or is_local_path(spec)


def open_archive(
    spec: str, options: RegistryOptions | None = None, *, cache_dir: Path | None = None, cache_size: int = 0
) -> Archive:
    """Open SOURCE from synchronous code (the CLI, the mount's parent process)."""
    if is_local(spec):
        from blobmount.source import open_local

        return open_local(spec)
    import trio

    return trio.run(_open_remote, spec, options or RegistryOptions(), cache_dir, cache_size)


async def _open_remote(spec: str, options: RegistryOptions, cache_dir: Path | None, cache_size: int) -> Archive:
    from blobmount.registry.source import open_registry

    return await open_registry(spec, options, cache_dir=cache_dir, cache_size=cache_size)


class Opening:
    """:func:`open_archive` on a background thread. While it waits on the network (the GIL is
    released), the main thread goes on importing and checking what the mount needs; `result()`
    joins it, before the mount forks, and raises what opening raised."""

    def __init__(self, spec: str, options: RegistryOptions, *, cache_dir: Path | None, cache_size: int) -> None:
        self._args = (spec, options, cache_dir, cache_size)
        self._archive: Archive | None = None
        self._error: BaseException | None = None
        self._talking = threading.Event()
        # a daemon thread: when the mount gives up first (a bad mountpoint), exiting does not wait
        self._thread = threading.Thread(target=self._run, name="blobmount-open", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        spec, options, cache_dir, cache_size = self._args
        try:
            if cache_dir is None:  # where a registry that ignores ranges gets its blob stored
                from blobmount.cache import default_cache_dir

                cache_dir = default_cache_dir()
            if not is_local(spec):
                import blobmount.registry.source  # noqa: F401  the HTTP stack, before the first request
            self._talking.set()
            self._archive = open_archive(spec, options, cache_dir=cache_dir, cache_size=cache_size)
        except BaseException as exc:  # handed to the main thread by result()
            self._error = exc
        finally:
            self._talking.set()

    def wait_talking(self, timeout_s: float = HEAD_START_WAIT_S) -> None:
        """Until the thread has its imports and sends its first request. Imports hold the GIL, so
        importing in both threads at once only delays that request; importing the rest while the
        thread waits on the network overlaps the two."""
        self._talking.wait(timeout_s)

    def result(self) -> Archive:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._archive is not None
        return self._archive
