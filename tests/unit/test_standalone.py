"""The repository stands alone: a clone of it, with nothing beside it, collects and passes its own
tests, and no tracked file points outside it.

What a user gets is `git clone` into a directory of their choosing: nothing next to it, nothing
above it. A test reading ``../something``, a script calling a sibling checkout's tool, or a link to
a document that only a developer's machine has works here and fails there. The clone test catches
the failures that show (collection, the unit and fs tiers here; the benchmark suite's smoke run in
tests/bench, in a clone of its own); the scan catches the references that might only show later (a
README link, a docstring naming a path)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.support.clone import CHECK_IMPORTS, child_env, git, lone_clone

ROOT = Path(__file__).resolve().parents[2]
CLONE_TEST = "tests/unit/test_standalone.py::test_a_lone_clone_collects_and_passes_its_tiers"
# tests/bench is not here: its smoke run clones HEAD itself (tests/support/clone.py), so the bench
# suite runs once per suite, from a lone clone, instead of once here and once in the work tree
CLONE_TIERS = ("tests/unit", "tests/fs")
CLONE_TIMEOUT_S = 2400  # hang guard only: the tiers take ~3 min on a busy 2-core machine


# -- what the scan looks at ------------------------------------------------------------------------


def tracked_text_files() -> dict[str, str]:
    """Every tracked file that is text (binary fixtures, images and archives are left out)."""
    out = {}
    for rel in git("ls-files", "-z").split("\0"):
        if not rel:
            continue
        try:
            data = (ROOT / rel).read_bytes()
        except FileNotFoundError:  # deleted in the work tree, not yet committed
            continue
        if b"\0" in data:
            continue
        try:
            out[rel] = data.decode()
        except UnicodeDecodeError:
            continue
    return out


def _inside(target: Path) -> bool:
    return os.path.normpath(target).startswith(str(ROOT) + os.sep) or os.path.normpath(target) == str(ROOT)


_PATH_TOKEN = re.compile(r"[\w.~%+@-]*(?:/[\w.~%+@-]*)+")  # a run of path characters with a '/'


def escaping_paths(rel: str, text: str) -> list[str]:
    """Relative paths in `text` (file `rel`) that lead out of the repository when taken from the
    file's directory: ``../x`` tokens with at least one real name after the dots. A bare ``../``
    (a syntax being described, not a place) and absolute paths are not references to a sibling."""
    found = []
    base = (ROOT / rel).parent
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _PATH_TOKEN.finditer(line):
            token = m.group(0)
            if "../" not in token or token.startswith("/") or line[max(0, m.start() - 1)] == ":":
                continue  # absolute, or the path part of a URL (scheme://host/...)
            names = [p for p in token.split("/") if p not in ("", ".", "..")]
            if names and not _inside(base / token):
                found.append(f"{rel}:{lineno}: {token}")
    return found


_SHARED_TEXT = re.compile(r"\.\.[/\\]shared\b|(?<![\w.-])/(?:[\w.-]+/)+shared(?=[/'\"`)\s]|$)")


def _is_up(node: ast.expr) -> bool:
    """Whether `node` is a path one step up from something: ``x.parent``, ``x.parents[k]``,
    ``x / ".."``, ``os.path.dirname(x)``, or the string ``".."``."""
    if isinstance(node, ast.Attribute):
        return node.attr == "parent"
    if isinstance(node, ast.Subscript):
        return isinstance(node.value, ast.Attribute) and node.value.attr == "parents"
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) and node.right.value == ".."
    if isinstance(node, ast.Call):
        func = node.func
        return (isinstance(func, ast.Attribute) and func.attr == "dirname") or (
            isinstance(func, ast.Name) and func.id == "dirname"
        )
    return isinstance(node, ast.Constant) and node.value == ".."


def shared_references(rel: str, text: str) -> list[str]:
    """Mentions of a sibling ``shared/`` directory: up one level and into it (``..`` then
    ``/shared``), an absolute ``…/shared/``, and in Python ``"shared"`` joined to a parent
    (``x.parent / "shared"``, ``join(dirname(x), "shared")``). A ``shared`` directory made under
    some other path (``tmp_path / "shared"``) is no such thing."""
    found = [
        f"{rel}:{n}: {m.group(0)}" for n, line in enumerate(text.splitlines(), 1) for m in _SHARED_TEXT.finditer(line)
    ]
    if rel.endswith(".py"):
        for node in ast.walk(ast.parse(text)):
            before: list[ast.expr] = []
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _is_shared(node.right):
                before = [node.left]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join":
                at = next((i for i, a in enumerate(node.args) if _is_shared(a)), None)
                before = node.args[:at] if at is not None else []
            if any(_is_up(b) for b in before):
                found.append(f"{rel}:{before[0].lineno}: a path to a sibling directory named 'shared'")
    return found


def _is_shared(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value in ("shared", b"shared")


def _level(node: ast.expr, names: dict[str, int]) -> int | None:
    """How many directories above this file the path expression `node` lands (0: the file itself),
    for the forms code uses to find the repository: ``Path(__file__)``, ``.resolve()``,
    ``.parent``, ``.parents[k]``, ``/ ".."``, ``os.path.dirname``, and names bound to those."""
    if isinstance(node, ast.Name):
        return 0 if node.id == "__file__" else names.get(node.id)
    if isinstance(node, ast.Call):
        func = node.func
        fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if fname == "Path" and len(node.args) == 1:
            return _level(node.args[0], names)
        if fname in ("resolve", "absolute", "abspath", "realpath") and isinstance(func, ast.Attribute):
            target = node.args[0] if node.args else func.value
            return _level(target, names)
        if fname == "dirname" and len(node.args) == 1:
            inner = _level(node.args[0], names)
            return None if inner is None else inner + 1
        return None
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        inner = _level(node.value, names)
        return None if inner is None else inner + 1
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
        inner = _level(node.value.value, names)
        k = node.slice
        if inner is not None and isinstance(k, ast.Constant) and isinstance(k.value, int):
            return inner + k.value + 1
        return None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        inner = _level(node.left, names)
        if inner is not None and isinstance(node.right, ast.Constant) and node.right.value == "..":
            return inner + 1
        return None
    return None


def python_escapes(rel: str, text: str) -> list[str]:
    """Python path expressions built from ``__file__`` that climb above the repository root."""
    depth = len(Path(rel).parts)  # levels from the file up to the root
    names: dict[str, int] = {}
    found = []
    nodes = sorted(
        (n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.expr | ast.Assign)),
        key=lambda n: (n.lineno, n.col_offset),
    )
    for node in nodes:
        if isinstance(node, ast.Assign):
            level = _level(node.value, names)
            for t in node.targets:
                if isinstance(t, ast.Name) and level is not None:
                    names[t.id] = level
            continue
        level = _level(node, names)
        if level is not None and level > depth:
            found.append(f"{rel}:{node.lineno}: {ast.unparse(node)} climbs {level - depth} level(s) above the root")
    return sorted(set(found))


_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_link_problems(rel: str, text: str) -> list[str]:
    """Relative links of a Markdown file that leave the repository or name nothing in it (code
    blocks and code spans hold no links; URLs, mailto: and in-page anchors are not checked)."""
    body = _CODE_SPAN.sub("", _FENCE.sub("", text))
    found = []
    base = (ROOT / rel).parent
    for target in [*_INLINE_LINK.findall(body), *_REF_DEF.findall(body)]:
        if _SCHEME.match(target) or target.startswith("#"):
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not path:
            continue
        dest = ROOT / path.lstrip("/") if path.startswith("/") else base / path
        if not _inside(dest):
            found.append(f"{rel}: link {target} leaves the repository")
        elif not os.path.exists(os.path.normpath(dest)):
            found.append(f"{rel}: link {target} names nothing in the repository")
    return found


# -- the scan --------------------------------------------------------------------------------------


def test_no_tracked_file_points_outside_the_repository() -> None:
    files = tracked_text_files()
    assert "README.md" in files  # the listing worked
    assert "pyproject.toml" in files
    problems = []
    for rel, text in files.items():
        problems += escaping_paths(rel, text)
        problems += shared_references(rel, text)
        if rel.endswith(".py"):
            problems += python_escapes(rel, text)
        if rel.endswith(".md"):
            problems += markdown_link_problems(rel, text)
    assert not problems, "references outside the repository:\n" + "\n".join(problems)


def test_the_scan_finds_what_it_is_meant_to_find() -> None:
    """Each rule, on text that breaks it (and on look-alikes that do not). The offending examples
    are assembled at run time, so that this file itself passes the scan."""
    up, sh = "." + "./", "sha" + "red"
    assert escaping_paths("README.md", f"see {up}{sh}/FORMAT.md") == [f"README.md:1: {up}{sh}/FORMAT.md"]
    assert escaping_paths("a/b.py", f'x = "{up}{up}etc/x"') == [f"a/b.py:1: {up}{up}etc/x"]
    assert escaping_paths("tests/fuse/t.py", f'b"{up}escape"') == []  # tests/escape: inside
    assert escaping_paths("README.md", f"a `/`, `./`, `{up}` or `dir:` prefix; /usr/{up}x") == []
    assert escaping_paths("README.md", f"https://example.org/a/{up}{up}b") == []

    assert shared_references("s.sh", f"run {up}{sh}/tools/x") == [f"s.sh:1: {up}{sh}"]
    assert shared_references("s.md", f"from /work/{sh}/FORMAT.md") == [f"s.md:1: /work/{sh}"]
    py = f'from pathlib import Path\nR = Path(__file__).parent\nT = R.parent / "{sh}" / "tools"\n'
    assert shared_references("b/s.py", py) == [f"b/s.py:3: a path to a sibling directory named '{sh}'"]
    joined = f'import os\nT = os.path.join(os.path.dirname(ROOT), "{sh}")\nU = tmp_path / "{sh}"\n'
    assert shared_references("b/s.py", joined) == [f"b/s.py:2: a path to a sibling directory named '{sh}'"]
    assert shared_references("x.md", f"mount --make-r{sh} / and a {sh} cache, tmp / '{sh}-cache'") == []

    climb = 'from pathlib import Path\nREPO = Path(__file__).resolve().parent.parent\nX = REPO.parent / "s"\n'
    assert python_escapes("bench/servers.py", climb) == [
        "bench/servers.py:3: REPO.parent climbs 1 level(s) above the root"
    ]
    ok = "from pathlib import Path\nROOT = Path(__file__).resolve().parents[2]\nY = ROOT / 'tests'\n"
    assert python_escapes("tests/unit/t.py", ok) == []
    assert python_escapes("tests/unit/t.py", ok.replace("parents[2]", "parents[3]")) != []

    md = f"[a](docs/FORMAT.md) [b]({up}{sh}/FORMAT.md) [c](missing.md) [d](https://x.org) [e](#top)\n"
    md += f"`[f]({up}in-code.md)`\n```\n[g]({up}in-block.md)\n```\n[h]: nowhere.md\n"
    assert markdown_link_problems("README.md", md) == [
        f"README.md: link {up}{sh}/FORMAT.md leaves the repository",
        "README.md: link missing.md names nothing in the repository",
        "README.md: link nowhere.md names nothing in the repository",
    ]


# -- the clone -------------------------------------------------------------------------------------


# Imports blobmount, bench and tests first and checks they are the clone's, then runs pytest in the
# same process, so the code under test is the code that was checked.
_RUN_IN_CLONE = (
    CHECK_IMPORTS
    + """
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""
)


@pytest.mark.slow
@pytest.mark.fuse
def test_a_lone_clone_collects_and_passes_its_tiers(tmp_path: Path) -> None:
    """`git clone` of this checkout's HEAD (committed work only) into a directory with no siblings;
    there, the whole suite collects, and the unit and fs tiers pass. This test is deselected inside
    the clone (it would recurse)."""
    clone = lone_clone(tmp_path)
    env = child_env(clone)

    def run(*pytest_args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _RUN_IN_CLONE, str(clone), "-p", "no:cacheprovider", *pytest_args],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=CLONE_TIMEOUT_S,
            check=False,
        )

    collected = run("--collect-only", "-q")
    out = collected.stdout + collected.stderr
    assert collected.returncode == 0, f"collection failed in the clone:\n{out[-6000:]}"
    assert f"imports from the clone: {{'blobmount': '{clone}/blobmount/__init__.py'" in out, out[:2000]
    count = re.search(r"(\d+) tests? collected", out)
    assert count, out[-2000:]
    assert int(count.group(1)) > 0, out[-2000:]

    tiers = run("-q", "--deselect", CLONE_TEST, *CLONE_TIERS)
    out = tiers.stdout + tiers.stderr
    assert tiers.returncode == 0, f"the unit and fs tiers failed in the clone:\n{out[-8000:]}"
    assert re.search(r"\d+ passed", out), out[-2000:]
