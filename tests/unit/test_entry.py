"""The console entry leaves without tearing the interpreter down (cli.run): what a command wrote
must still arrive whole, and its exit status must be kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.helpers import FIXTURES, tree_files

CMD = [sys.executable, "-m", "blobmount.cli"]
BUFFERED = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as users run it


def test_buffered_output_arrives_whole_and_the_status_is_kept() -> None:
    # a pipe makes stdout block-buffered: nothing may be left in the buffer at exit
    done = subprocess.run(
        [*CMD, "ls", f"dir:{FIXTURES / 'mixed'}", "-l"], capture_output=True, timeout=60, check=False, env=BUFFERED
    )
    assert done.returncode == 0
    listed = subprocess.run(
        [*CMD, "ls", f"dir:{FIXTURES / 'mixed'}"], capture_output=True, timeout=60, check=False, env=BUFFERED
    )
    assert len(done.stdout.splitlines()) == len(listed.stdout.splitlines()) > 1
    path, f = max(tree_files("mixed").items(), key=lambda kv: len(kv[1].data))
    cat = subprocess.run(
        [*CMD, "cat", f"dir:{FIXTURES / 'mixed'}", os.fsdecode(path)], capture_output=True, timeout=60, env=BUFFERED
    )
    assert cat.returncode == 0
    assert cat.stdout == f.data
    inspected = subprocess.run(
        [*CMD, "inspect", f"dir:{FIXTURES / 'mixed'}", "--json"], capture_output=True, timeout=60, env=BUFFERED
    )
    assert inspected.returncode == 0
    assert json.loads(inspected.stdout)["entries"] == 300  # print() output, flushed at exit
    missing = subprocess.run(
        [*CMD, "ls", "/nonexistent"], capture_output=True, text=True, timeout=60, check=False, env=BUFFERED
    )
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1


def test_a_reader_that_goes_away_is_not_an_error() -> None:
    path, _ = max(tree_files("mixed").items(), key=lambda kv: len(kv[1].data))
    cmd = [*CMD, "cat", f"dir:{FIXTURES / 'mixed'}", os.fsdecode(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=BUFFERED)
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(60) == 0
    assert b"Traceback" not in err


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(out.stdout.split())


def test_the_mount_starts_opening_before_the_http_stack_is_loaded() -> None:
    """cli.cmd_mount builds its config and starts sources.Opening with nothing heavy imported, so
    that the registry's round trips overlap the imports (config.py, registry/options.py)."""
    loaded = _modules_after("import blobmount.cli, blobmount.config, blobmount.sources")
    assert not loaded & {"httpx", "trio", "pyfuse3", "blobmount.registry.client", "tempfile"}


def test_mounting_never_loads_the_index_builder_or_a_toml_parser() -> None:
    loaded = _modules_after("import blobmount.mount, blobmount.sources.remote")
    assert not loaded & {"flatbuffers", "blobmount.index.build", "blobmount.create", "tomllib"}
