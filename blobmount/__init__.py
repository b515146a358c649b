"""blobmount: mount blob archives (FlatBuffers index + data blob) read-only through FUSE.

``blobmount.open(SOURCE, …)`` opens one without FUSE (blobmount.api); it is loaded on first use so
that importing the package (every command, the mount's start-up) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from blobmount.api import Archive as Archive
    from blobmount.api import Stat as Stat
    from blobmount.api import aopen as aopen
    from blobmount.api import open as open


def __getattr__(name: str) -> Any:
    if name in ("open", "aopen", "Archive", "Stat"):
        from blobmount import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
