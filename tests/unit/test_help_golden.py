"""Every command's `--help` is diffed against the text captured from the code before the
configuration/CLI restructuring (issue 16): splitting cli.py must be no user-visible change.

Regenerate only on a deliberate change: BLOBMOUNT_WRITE_HELP_GOLDEN=1 pytest this file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blobmount.cli import main

GOLDEN = Path(__file__).parent / "golden" / "help.txt"

COMMANDS: list[list[str]] = [
    [],
    ["mount"],
    ["status"],
    ["create"],
    ["ls"],
    ["cat"],
    ["cp"],
    ["push"],
    ["inspect"],
    ["prefetch"],
    ["profile"],
    ["profile", "save"],
    ["profile", "push"],
    ["cache"],
    ["cache", "status"],
    ["cache", "prune"],
]


def _help(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    # main() turns argparse's SystemExit into its return code.
    try:
        code = main([*cmd, "--help"])
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    assert code == 0
    return capsys.readouterr().out


def test_help_of_every_command_is_unchanged(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    text = "".join(f"==== blobmount {' '.join(cmd)} --help\n{_help(cmd, capsys)}" for cmd in COMMANDS)
    if os.environ.get("BLOBMOUNT_WRITE_HELP_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
