"""The README's shell blocks as the tests read them: test_readme runs every line, test_sidecar the
podman lines marked ENGINE_RUN."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
ENGINE_RUN = "# run in CI by tests/fuse/test_sidecar.py"  # that test runs these lines, in order


def sh_lines() -> list[str]:
    """Command lines of the README's ```sh blocks, continuations joined, comments-only lines dropped."""
    lines: list[str] = []
    for block in re.findall(r"^```sh\n(.*?)^```", README.read_text(), flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return lines


def without_comment(line: str) -> str:
    return " ".join(shlex.split(line, comments=True))


def engine_lines() -> list[str]:
    return [line for line in sh_lines() if ENGINE_RUN in line]
