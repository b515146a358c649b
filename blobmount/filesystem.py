"""An fsspec filesystem for blob archives: the protocol ``blob``, registered by entry point.

URL grammar (README, *Python and fsspec*):

- registry: ``blob://HOST[:PORT]/REPO…:TAG/PATH`` or ``blob://HOST[:PORT]/REPO…@sha256:HEX/PATH``.
  Repository names contain ``/`` but never ``:`` or ``@`` (the distribution grammar), so the first
  path segment after the host that holds either ends the reference; everything after it is the
  path inside the archive, where ``:`` is an ordinary character. A tag or a digest is required.
- ``oci:`` layout: ``blob://oci:/ABS/LAYOUT:TAG/PATH`` (or ``@sha256:HEX``), the same rule: the
  first segment holding ``:`` or ``@`` ends the layout reference, so the layout's own directory
  names cannot hold either.
- local archive directory: ``blob:///ABS/DIR/PATH`` — the archive is the nearest ancestor of PATH
  that holds both ``index.blob`` and ``data.blob``.

Paths this filesystem returns keep that shape without the protocol (``HOST/REPO:TAG/dir/file``),
so ``find``/``glob``/``walk`` results can be passed back. Each reference is opened once per
filesystem instance (by :func:`blobmount.open`, with this instance's options) and kept.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any, ClassVar

from fsspec.spec import AbstractFileSystem

from blobmount import api

__all__ = ["BlobFileSystem", "split_url"]


def split_url(path: str) -> tuple[str, str]:
    """(SOURCE as the CLI takes it, path inside the archive) for a path without ``blob://``."""
    path = path.removeprefix("blob://")
    if path.startswith("oci:"):
        segments = path[len("oci:") :].split("/")
        for i, seg in enumerate(segments):
            if ":" in seg or "@" in seg:
                return "oci:" + "/".join(segments[: i + 1]), "/".join(segments[i + 1 :])
        raise ValueError(f"blob://{path}: an oci: layout URL needs :TAG or @DIGEST after the layout path")
    if path.startswith("/"):
        probe = Path(path)
        for candidate in (probe, *probe.parents):
            if (candidate / "index.blob").is_file() and (candidate / "data.blob").is_file():
                inner = probe.relative_to(candidate).as_posix()
                return str(candidate), "" if inner == "." else inner
        raise FileNotFoundError(errno.ENOENT, f"{path}: no archive (index.blob + data.blob) in it or above it")
    host, sep, rest = path.partition("/")
    segments = rest.split("/") if sep else []
    for i, seg in enumerate(segments):
        if ":" in seg or "@" in seg:
            if i == 0 and seg.startswith(("@", ":")):
                break
            return host + "/" + "/".join(segments[: i + 1]), "/".join(segments[i + 1 :])
    raise ValueError(f"blob://{path}: the reference must end in :TAG or @sha256:DIGEST (blob://HOST/REPO:TAG/PATH)")


class BlobFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """Read-only fsspec filesystem over blob archives (module docstring for the URL grammar).

    Options: ``cache_dir`` (shared with mounts; None: chunks in memory), ``cache_size``,
    ``verify`` (``lazy``/``strict``/``background``, as the mount), ``verify_threshold``,
    ``plain_http`` (hosts), ``timeout`` (seconds per registry operation), ``offline``."""

    protocol: ClassVar[str] = "blob"
    root_marker: ClassVar[str] = ""

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_size: int | None = None,
        verify: str = "lazy",
        verify_threshold: int | None = None,
        plain_http: tuple[str, ...] | list[str] = (),
        timeout: float | None = None,
        offline: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._open_kwargs: dict[str, Any] = {
            "cache_dir": cache_dir,
            "cache_size": cache_size,
            "verify": verify,
            "verify_threshold": verify_threshold,
            "plain_http": tuple(plain_http),
            "timeout": timeout,
            "offline": offline,
        }
        self._archives: dict[str, api.Archive] = {}
        self._lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = os.fspath(path) if not isinstance(path, str) else path
        text = text.removeprefix("blob://").removeprefix("blob::")
        return text.rstrip("/") if text not in ("/", "") else text

    def unstrip_protocol(self, name: str) -> str:
        return name if name.startswith("blob://") else "blob://" + name

    # -- archives ----------------------------------------------------------------------------------

    def _archive(self, path: str) -> tuple[api.Archive, str, str]:
        """(archive, its root as this filesystem names it, path inside it)."""
        spec, inner = split_url(self._strip_protocol(path))
        with self._lock:
            archive = self._archives.get(spec)
            if archive is None:
                archive = self._archives[spec] = api.open(spec, **self._open_kwargs)
        return archive, spec, inner

    def close_archives(self) -> None:
        """Close every archive this instance opened (they reopen on next use)."""
        with self._lock:
            archives, self._archives = list(self._archives.values()), {}
        for archive in archives:
            archive.close()

    @staticmethod
    def _join(root: str, inner: str) -> str:
        return f"{root}/{inner}" if inner else root

    def _info_of(self, root: str, st: api.Stat) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self._join(root, st.path),
            "size": st.size,
            "type": st.type,
            "mode": st.mode,
            "uid": st.uid,
            "gid": st.gid,
            "mtime": st.mtime_ns / 1e9,
        }
        if st.type == "file":
            info.update(sha256=st.sha256, compression=st.compression, stored_size=st.stored_size)
        return info

    # -- AbstractFileSystem ------------------------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        archive, root, inner = self._archive(path)
        rows = [self._info_of(root, st) for st in archive.ls(inner)]
        return rows if detail else [r["name"] for r in rows]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        archive, root, inner = self._archive(path)
        return self._info_of(root, archive.stat(inner))

    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            archive, _root, inner = self._archive(path)
        except (FileNotFoundError, ValueError):
            return False
        return archive.exists(inner)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """Whole files are verified before they are returned; ranges follow the verify policy.
        Negative `start`/`end` count from the end of the file (fsspec's convention)."""
        archive, _root, inner = self._archive(path)
        if start is None and end is None:
            return archive.read_bytes(inner)
        size = archive.stat(inner).size
        lo = 0 if start is None else (max(0, size + start) if start < 0 else start)
        hi = size if end is None else (max(0, size + end) if end < 0 else end)
        return archive.read_range(inner, lo, hi) if lo < hi else b""

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True, **kwargs: Any) -> Any:
        if mode != "rb":
            raise OSError(errno.EROFS, f"{path}: blob archives are read-only (mode {mode!r})")
        archive, _root, inner = self._archive(path)
        return archive.open(inner)

    def checksum(self, path: str) -> int:
        sha = self.info(path).get("sha256")
        return int(sha[:16], 16) if sha else super().checksum(path)

    def ukey(self, path: str) -> str:
        info = self.info(path)
        return str(info.get("sha256") or info["name"])

    def _rm(self, path: str) -> None:
        raise OSError(errno.EROFS, f"{path}: blob archives are read-only")

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, f"{path}: blob archives are read-only")

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        raise OSError(errno.EROFS, f"{path}: blob archives are read-only")

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, f"{path2}: blob archives are read-only")
