"""The benchmark suite keeps working: `python -m bench --quick` runs end to end against the real
peers that `make test` installs (squashfuse, httpfs2 behind nginx, docker-registry, curl) and writes
well-formed results. No timing is asserted: the figures are the suite's business, not the test's.
Missing tools fail the run (--no-install: the suite checks and names what is missing), never skip.

The suite runs from a lone clone of HEAD (tests/support/clone.py): a benchmark reaching outside the
repository (a sibling's tool, a dataset only a developer's machine has) fails here. This is the only
run of the bench suite in a test session; tests/unit/test_standalone.py runs the other tiers in a
clone of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.janitor import WORK_ROOT, mounts_under
from tests.support.clone import CHECK_IMPORTS, child_env, lone_clone
from tests.support.mounts import require_fuse

SMOKE_TIMEOUT_S = 900  # hang guard only; the smoke run takes 2-3 minutes on a busy 2-core machine
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.fuse
@pytest.mark.slow
def test_quick_suite_writes_results(tmp_path: Path) -> None:
    require_fuse()
    if os.geteuid() != 0:
        pytest.fail("the benchmark suite needs root (drop_caches, mounts); CI runs as root")
    out = tmp_path / "results"
    clone = lone_clone(tmp_path)
    env = child_env(clone)
    where = subprocess.run(
        [sys.executable, "-c", CHECK_IMPORTS, str(clone)],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert where.returncode == 0, where.stdout + where.stderr  # the suite below runs the clone's code
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--no-install", "--out", str(out)],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=SMOKE_TIMEOUT_S,
            check=False,
        )
    finally:  # the benchmark datasets the run built in the clone: ~0.5 GB of a shared disk
        shutil.rmtree(clone / "bench" / ".cache", ignore_errors=True)
    assert done.returncode == 0, f"suite failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    (doc_path,) = out.glob("*-quick.json")
    doc = json.loads(doc_path.read_text())
    assert doc["quick"] is True
    assert doc["params"]["networks"] == ["local", "loopback"]
    records = doc["records"]
    assert records
    assert all(r["status"] == "ok" for r in records), [r for r in records if r["status"] != "ok"]
    assert all(isinstance(r["seconds"], float) and r["seconds"] >= 0 for r in records)
    ran = {(r["network"], r["peer"], r["dataset"], r["workload"], r["phase"]) for r in records}
    for network, peer in (("local", "blobmount-dir"), ("loopback", "blobmount-reg")):
        for ds, workloads in (
            ("tree", ("ready", "ttfb", "find", "readall_p8", "readall_p1", "import", "git_status")),
            ("big", ("ready", "ttfb", "seq", "rand4k", "par8")),
        ):
            for wl in workloads:
                for phase in ("cold", "warm"):
                    assert (network, peer, ds, wl, phase) in ran, (network, peer, ds, wl, phase)
    assert ("loopback", "blobmount-reg", "big", "seq", "remount") in ran
    peers = {r["peer"] for r in records}
    assert {"plain", "squashfuse", "httpfs2", "curl", "curl-8", "http-range"} <= peers
    # the servers' logs were counted: a cold remote read fetched something
    cold_seq = [r for r in records if r["peer"] == "blobmount-reg" and r["workload"] == "seq" and r["phase"] == "cold"]
    assert cold_seq[0]["fetched_bytes"] > 0
    assert cold_seq[0]["requests"] > 0
    git_runs = [r for r in records if r["workload"] == "git_status" and r["peer"] == "plain"]
    assert git_runs[0]["changed_paths"] == 0  # the plain tree is a clean checkout
    assert doc["summary"]["local"]["big/seq"]["cold"]["blobmount-dir"]["n"] == 1
    assert {t["issue"] for t in doc["targets"]} >= {"3", "4", "5", "8"}
    scale = doc["scale"]
    assert [s["kind"] for s in scale] == ["tree", "flat"]
    assert all("reps" in s for s in scale)
    assert doc["index_scale"]["rows"]
    md = (out / doc_path.name.replace(".json", ".md")).read_text()
    assert "## Targets" in md
    assert "| workload | phase | unit |" in md
    assert "## Scale" in md
    for name in doc["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({'./' + name})" in md
    # nothing left behind: no mount under the suite's work root (compared by path: another run's
    # root, such as /var/tmp/blobmount-bench-x, may hold mounts of its own meanwhile)
    assert mounts_under(WORK_ROOT) == []
