"""tests/fs/TWINS.md cannot rot: every mounted test (a ``test_`` function under tests/fuse) has
exactly one row, every row names a mounted test that exists, and every kernel-free twin a row
names is a ``test_`` function of that file under tests/fs. A row without a twin says why
(kernel-only, or no handler path)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
TABLE = TESTS / "fs" / "TWINS.md"
ROW = re.compile(r"^\| `(tests/fuse/[\w/]+\.py)::(test_\w+)` \| (.+?) \|(.*)\|$")
TWIN = re.compile(r"`([\w/]+\.py)::(test_\w+)`")


def _tests_of(path: Path) -> set[str]:
    """The test functions defined at module level in `path`."""
    tree = ast.parse(path.read_text())
    return {
        n.name
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")
    }


def _rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in TABLE.read_text().splitlines():
        if line.startswith("| `tests/fuse/"):
            match = ROW.match(line)
            assert match, f"a row of TWINS.md that does not read as one: {line}"
            rows.append((match[1], match[2], match[3], match[4]))
    return rows


def test_every_mounted_test_has_exactly_one_row() -> None:
    mounted = {
        f"{p.relative_to(TESTS.parent)}::{name}" for p in (TESTS / "fuse").glob("test_*.py") for name in _tests_of(p)
    }
    listed = [f"{path}::{name}" for path, name, _, _ in _rows()]
    assert len(listed) == len(set(listed)), "a mounted test has two rows"
    assert sorted(mounted - set(listed)) == [], "mounted tests without a row in TWINS.md"
    assert sorted(set(listed) - mounted) == [], "rows of TWINS.md for mounted tests that do not exist"


def test_every_twin_named_exists() -> None:
    defined: dict[str, set[str]] = {}
    named = 0
    for path, name, twins, note in _rows():
        found = TWIN.findall(twins)
        if not found:
            assert twins.startswith(("kernel-only", "no handler path")), f"{path}::{name}: no twin and no reason"
            assert note.strip(), f"{path}::{name}: {twins} needs its reason in the note"
        for file, test in found:
            target = TESTS / "fs" / file
            assert target.is_file(), f"{path}::{name}: twin file tests/fs/{file} does not exist"
            defined.setdefault(file, _tests_of(target))
            assert test in defined[file], f"{path}::{name}: tests/fs/{file} has no {test}"
            named += 1
    assert named > 0
