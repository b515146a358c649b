"""A lone clone of this checkout's HEAD: what a user gets from `git clone` into a directory of
their choosing, with nothing beside it and nothing above it that the repository could lean on.

Shared by the tests that must prove the repository stands alone (tests/unit/test_standalone.py
runs the unit and fs tiers there; tests/bench/test_suite_smoke.py runs the benchmark suite there),
so each tier runs once per suite, in the clone, rather than once here and again in a clone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GIT_TIMEOUT_S = 120


def git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


def lone_clone(tmp_path: Path) -> Path:
    """`git clone` of HEAD (committed work only) into ``tmp_path/x/clone``, which has no siblings."""
    head = git("rev-parse", "HEAD").strip()
    lone = tmp_path / "x"
    lone.mkdir()
    clone = lone / "clone"
    git("clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone), cwd=lone)
    git("checkout", "--quiet", "--detach", head, cwd=clone)
    assert sorted(p.name for p in lone.iterdir()) == ["clone"]  # no siblings at all
    return clone


def child_env(clone: Path) -> dict[str, str]:
    """The environment of a process that must import the clone's code: its root ahead of the
    venv's editable install of this work tree, and none of this pytest's own variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONPATH"))}
    env["PYTHONPATH"] = str(clone)
    return env


# Imports blobmount, bench and tests and checks they are the clone's (exit 1 if not); prints where.
CHECK_IMPORTS = """
import sys
import blobmount, bench, tests
root = sys.argv[1]
where = {m.__name__: m.__file__ for m in (blobmount, bench, tests)}
wrong = {k: v for k, v in where.items() if not (v or "").startswith(root + "/")}
if wrong:
    sys.exit(f"imported from outside the clone: {wrong}")
print("imports from the clone:", where, flush=True)
"""
