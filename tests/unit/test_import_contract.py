"""Who may import what: each heavy library has one owner, and the lower layers never reach up.

The rules are the design's (DESIGN §2, the README's Architecture): the FUSE binding stays with the
handlers and the mount's life, HTTP with the OCI client, FlatBuffers with the index facade, zstd
with the code that writes and reads entries; ``cache/`` and ``index/`` know nothing above them,
and ``registry/`` knows nothing of the cache (tests/unit/test_registry_layers.py holds its finer
rules). Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import blobmount

PACKAGE = Path(blobmount.__file__).resolve().parent

# library -> the modules (or packages, ending in ".") that may import it
OWNERS: Mapping[str, tuple[str, ...]] = {
    # handlers, their one wrapper, inode attributes, the kernel's caches, life, inode numbers
    "pyfuse3": (
        "blobmount.fs",
        "blobmount.handler",
        "blobmount.inodes",
        "blobmount.kernel",
        "blobmount.mount",
        "blobmount.generations",
    ),
    "pyfuse3_asyncio": (),
    "httpx": ("blobmount.registry.",),
    "httpcore": ("blobmount.registry.transport",),
    "zstandard": ("blobmount.create.files", "blobmount.decode", "blobmount.extract.writer", "blobmount.reader"),
    "flatbuffers": ("blobmount.index.",),
}
# package (ending in ".") or module -> the blobmount modules it may import besides its own package
LOWER: Mapping[str, tuple[str, ...]] = {
    "blobmount.index.": ("blobmount.errors",),
    "blobmount.cache.": (
        "blobmount.errors",
        "blobmount.daemon",
        "blobmount.daemon.metrics",
        "blobmount.defaults",
        "blobmount.lru",
        "blobmount.flight",
    ),
    "blobmount.flight": (),
    "blobmount.lru": (),
    "blobmount.progress": (),
    "blobmount.defaults": (),
    "blobmount.errors": (),
    "blobmount.reference": ("blobmount.errors",),
}
# what nothing below may import: (importer prefix, forbidden prefix)
NEVER: tuple[tuple[str, str], ...] = (
    ("blobmount.registry.", "blobmount.cache"),
    ("blobmount.registry.", "blobmount.fetch"),
    ("blobmount.registry.", "blobmount.sources"),
    ("blobmount.cache.", "blobmount.registry"),
    ("blobmount.index.", "blobmount.registry"),
)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` names in an import, anywhere in it, relative imports resolved."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from blobmount import cache`
    return found


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name.startswith(p) if p.endswith(".") else name == p for p in patterns)


def violations(root: Path) -> list[str]:
    """One line per import that breaks OWNERS, LOWER or NEVER, for the package at `root`."""
    known = {module_name(root, p) for p in root.rglob("*.py")}
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(root, path)
        if "._fb" in name:  # flatc's generated accessors
            continue
        for imported in sorted(imports_of(path, name)):
            top = imported.partition(".")[0]
            if top in OWNERS and not _matches(name, OWNERS[top]):
                out.append(f"{name} imports {top}")
            if not imported.startswith(root.name + ".") or imported not in known:
                continue
            for scope, allowed in LOWER.items():
                own = scope if scope.endswith(".") else scope + "."
                if _matches(name, (scope,)) and not imported.startswith(own) and not _matches(imported, allowed):
                    out.append(f"{name} imports {imported}, above it")
            for importer, forbidden in NEVER:
                if name.startswith(importer) and imported.startswith(forbidden):
                    out.append(f"{name} imports {imported}")
    return out


def test_the_package_keeps_its_import_contract() -> None:
    assert violations(PACKAGE) == []


def test_the_checker_sees_each_kind_of_breach(tmp_path: Path) -> None:
    """A contract test that cannot fail proves nothing: a small package breaking each rule once,
    lazily and relatively included, must be reported line by line."""
    root = tmp_path / "blobmount"
    for sub in ("cache", "registry", "index"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "errors.py").write_text("")
    (root / "fetch.py").write_text("")
    (root / "cli.py").write_text("def f():\n    import httpx\n")
    (root / "cache" / "space.py").write_text("from .. import fetch\n")
    (root / "registry" / "client.py").write_text("from blobmount.cache import space\n")
    (root / "index" / "view.py").write_text("import zstandard\nfrom blobmount import errors\n")
    assert sorted(violations(root)) == [
        "blobmount.cache.space imports blobmount.fetch, above it",
        "blobmount.cli imports httpx",
        "blobmount.index.view imports zstandard",
        "blobmount.registry.client imports blobmount.cache",
        "blobmount.registry.client imports blobmount.cache.space",
    ]


def test_tests_share_code_only_through_the_support_package() -> None:
    """A test module imports helpers from tests/support, never from another test module or a
    conftest: moving or deleting a test must not break its neighbours."""
    tests_root = PACKAGE.parent / "tests"
    crossing = []
    for path in sorted(tests_root.rglob("*.py")):
        name = module_name(tests_root, path)
        for imported in imports_of(path, name):
            if imported.startswith("tests.") and not imported.startswith("tests.support"):
                crossing.append(f"{name} imports {imported}")
    assert crossing == []
