"""SOURCE string -> opened :class:`~blobmount.source.Archive`, local or remote (DESIGN §8).

`oci:PATH[:TAG]`, `dir:PATH` and paths starting with `/`, `./`, `../` are local; anything else is a
registry reference. Kept apart from source.py so that the local sources never import registry/.
"""

from __future__ import annotations

from pathlib import Path

import trio

from blobmount.registry.client import RegistryOptions
from blobmount.registry.source import open_registry
from blobmount.source import Archive, is_local_path, open_local


def is_local(spec: str) -> bool:
    return spec.startswith(("oci:", "dir:")) or is_local_path(spec)


def open_archive(
    spec: str, options: RegistryOptions | None = None, *, cache_dir: Path | None = None, cache_size: int = 0
) -> Archive:
    """Open SOURCE from synchronous code (the CLI, the mount's parent process)."""
    if is_local(spec):
        return open_local(spec)
    return trio.run(_open_remote, spec, options or RegistryOptions(), cache_dir, cache_size)


async def _open_remote(spec: str, options: RegistryOptions, cache_dir: Path | None, cache_size: int) -> Archive:
    return await open_registry(spec, options, cache_dir=cache_dir, cache_size=cache_size)
