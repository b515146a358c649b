"""Path rules of the archive format (docs/FORMAT.md, "Paths and directories"): one predicate, one message per rule.

Paths are bytes everywhere: the reference stores non-UTF-8 names unchanged and FUSE names are bytes.
"""

from __future__ import annotations

NAME_MAX_BYTES = 255  # Linux NAME_MAX: the kernel cannot hand a longer name to lookup()
PATH_MAX_BYTES = 4095  # Linux PATH_MAX minus the NUL: longer paths cannot be opened through a mount


def path_problem(path: bytes) -> str | None:
    """Why `path` is not a valid archive path, or None when it is."""
    if (  # most paths: short, no component starting with '.', no empty one (one check per entry of a walk)
        path
        and len(path) <= NAME_MAX_BYTES
        and path[0] != 0x2F
        and path[-1] != 0x2F
        and path[0] != 0x2E
        and b"/." not in path
        and b"//" not in path
        and b"\x00" not in path
    ):
        return None
    return _path_problem(path)


def _path_problem(path: bytes) -> str | None:
    """:func:`path_problem`, every rule in turn."""
    if not path:
        return "empty path"
    if len(path) > PATH_MAX_BYTES:
        return f"path of {len(path)} bytes exceeds {PATH_MAX_BYTES}"
    if b"\x00" in path:
        return "path contains a NUL byte"
    if path.startswith(b"/"):
        return "absolute path"
    if path.endswith(b"/"):
        return "trailing '/'"
    for part in path.split(b"/"):
        if not part:
            return "empty path component ('//')"
        if part == b"..":
            return "'..' component escapes the archive root"
        if part == b".":
            return "'.' component"
        if len(part) > NAME_MAX_BYTES:
            return f"name of {len(part)} bytes exceeds {NAME_MAX_BYTES}"
    return None


def name_problem(name: bytes) -> str | None:
    """Why one path component cannot be a directory entry's name, or None."""
    if not name:
        return "empty path component ('//')"
    if name in (b".", b".."):
        return f"'{name.decode()}' component"
    if b"\x00" in name:
        return "path contains a NUL byte"
    if len(name) > NAME_MAX_BYTES:
        return f"name of {len(name)} bytes exceeds {NAME_MAX_BYTES}"
    return None


def show(path: bytes, limit: int = 120) -> str:
    """A printable, bounded rendering of a byte path for one-line messages."""
    text = repr(path)[2:-1] if not _printable_utf8(path) else path.decode()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"'{text}'"


def _printable_utf8(path: bytes) -> bool:
    try:
        text = path.decode()
    except UnicodeDecodeError:
        return False
    return text.isprintable()
