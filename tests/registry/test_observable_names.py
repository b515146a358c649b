"""The names users and dashboards depend on stay as they are: every /metrics series (name and label
values) that a push, a pull and a cold read produce, and every `status --json` key, against a golden
file captured before the registry client was split into modules. A refactor below the HTTP line
must not rename a metric, relabel a request kind or drop a status key; a deliberate change
regenerates the golden file (BLOBMOUNT_REGEN_GOLDEN=1) and says so in its commit."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from blobmount.cli import main
from blobmount.daemon import metrics
from blobmount.daemon.control import DaemonState
from blobmount.reference import Reference
from blobmount.registry.options import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support.helpers import FIXTURES, tree_files
from tests.support.servers import Registry

GOLDEN = Path(__file__).resolve().parent / "golden"
_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s")


def _series() -> list[str]:
    """`name{label="value",...}` of every rendered sample (values dropped), and each family's TYPE."""
    out = set()
    for line in metrics.render().splitlines():
        if line.startswith("# TYPE "):
            out.add(line)
            continue
        match = _SERIES.match(line)
        if match and not line.startswith("#"):
            labels = match.group(2) or ""
            labels = re.sub(r'(blobmount_info\{.*?version=)"[^"]*"', r'\1"*"', match.group(1) + labels)
            out.add(labels)
    return sorted(out)


def _keys(doc: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in doc.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _keys(value, prefix + key + ".")
    return keys


def _check(name: str, lines: list[str]) -> None:
    path = GOLDEN / name
    text = "\n".join(lines) + "\n"
    if os.environ.get("BLOBMOUNT_REGEN_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from the golden file"


def test_metrics_series_of_push_pull_and_cold_read_are_unchanged(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    metrics.reset()
    ref = Reference.parse(f"{registry.host}/golden/mixed:v1")
    trio.run(
        functools.partial(push_archive, FIXTURES / "mixed", ref, RegistryOptions(), created="2024-01-02T03:04:05Z")
    )
    files = list(tree_files("mixed").items())
    biggest = max(files, key=lambda item: len(item[1].data))
    for path, f in (files[0], biggest):
        assert main(["cat", str(ref), os.fsdecode(path)]) == 0
        assert capsysbinary.readouterr().out == f.data
    _check("metrics-series.txt", _series())


def test_status_json_keys_are_unchanged(tmp_path: Path) -> None:
    state = DaemonState(tmp_path, "src", "pinned", "sha256:i", "sha256:d", 1, 2, tmp_path, 3)
    _check("status-keys.txt", _keys(state.status()))
