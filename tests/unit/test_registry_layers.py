"""registry/ is a pure OCI distribution client: it imports nothing of the cache, the fetcher, the
sources or anything else above it, and httpx is imported only where HTTP is spoken."""

from __future__ import annotations

import ast
from pathlib import Path

import blobmount

REGISTRY = Path(blobmount.__file__).resolve().parent / "registry"
MAX_LINES = 400
BELOW = {
    "blobmount.__version__",
    "blobmount.errors",
    "blobmount.defaults",
    "blobmount.progress",
    "blobmount.lru",
    "blobmount.reference",
    "blobmount.manifest",
    "blobmount.daemon",
    "blobmount.daemon.metrics",
    "blobmount.daemon.logs",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "blobmount":
                names.update(f"blobmount.{alias.name}" for alias in node.names)
    return names


def test_registry_imports_only_itself_and_what_lies_below() -> None:
    for path in sorted(REGISTRY.glob("*.py")):
        ours = {n for n in _imports(path) if n == "blobmount" or n.startswith("blobmount.")}
        above = {n for n in ours - BELOW if not n.startswith("blobmount.registry") and n != "blobmount"}
        assert not above, f"{path.name} imports {sorted(above)}"


def test_no_registry_module_outgrows_one_concern() -> None:
    for path in sorted(REGISTRY.glob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.name}: {lines} lines"
