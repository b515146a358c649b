"""Prefetch profiles end to end, on a real docker-registry (2.8: no referrers API, so the tag
schema's `sha256-<hex>` index) and real FUSE mounts: record what a workload reads, save it, push it
as a referrer, list it with `inspect`, and mount with `--prefetch-profile auto` on a fresh cache:
the profile's bytes arrive in a few range requests and the workload then reads without one.
Hostile profiles (huge, malformed, naming paths not in the archive, published or local) cost one
warning and never the mount."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from blobmount import profile
from blobmount.reference import Reference
from blobmount.referrers import fallback_tag, push_profile
from blobmount.registry.client import RegistryOptions
from tests.support.faults import Fault, FaultProxy, Kind, path_prefix
from tests.support.mounts import Mount, blobmount_cmd, mounted
from tests.support.servers import Registry, start_registry

pytestmark = pytest.mark.fuse

RUN_GUARD_S = 120.0  # hang guard for one CLI command (the machine may be loaded)
PREFETCH_WAIT_S = 60.0
CHUNK = ("--chunk-size", "64K")


@pytest.fixture
def logged_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry of the test's own whose access log counts the requests."""
    reg = start_registry(tmp_path / "registry", access_log=True)
    try:
        yield reg
    finally:
        reg.stop()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(blobmount_cmd(*args), capture_output=True, text=True, timeout=RUN_GUARD_S, check=False)


def _tree(root: Path) -> Path:
    """`a/` and `z/` of small files around a large raw file: the data blob is in path order."""
    for d in ("a", "z"):
        (root / d).mkdir(parents=True)
        for i in range(30):
            (root / d / f"f{i:02}.txt").write_bytes(f"{d}{i}".encode() * 5000)  # ~15-20 KB each
    (root / "m").mkdir()
    (root / "m" / "big.bin").write_bytes(os.urandom(6 << 20))
    return root


def _workload(mnt: Path) -> None:
    for i in range(30):
        (mnt / "a" / f"f{i:02}.txt").read_bytes()
    with open(mnt / "m" / "big.bin", "rb") as f:
        f.read(2 << 20)


def _push_tree(reg: Registry, tmp_path: Path) -> str:
    ref = f"{reg.host}/prof/tree:v1"
    out = _cli("push", str(_tree(tmp_path / "src")), ref, "--compression", "none")
    assert out.returncode == 0, out.stderr
    return ref


def _log_text(reg: Registry) -> str:
    return (reg.root / "registry.log").read_text(errors="replace")


def _blob_gets(text: str, digest: str) -> int:
    return sum(1 for line in text.splitlines() if f"/blobs/{digest}" in line and '"GET ' in line)


def _wait_log(m: Mount, needle: str) -> str:
    deadline = time.monotonic() + PREFETCH_WAIT_S
    while time.monotonic() < deadline:
        text = m.log()
        if needle in text:
            return text
        time.sleep(0.1)
    pytest.fail(f"{needle!r} not in the daemon's log after {PREFETCH_WAIT_S} s:\n{m.log()}")


def _data_digest(ref: str) -> str:
    out = _cli("inspect", ref, "--json")
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["data_digest"])


def test_record_save_push_list_and_prefetch_auto(logged_registry: Registry, tmp_path: Path) -> None:
    ref = _push_tree(logged_registry, tmp_path)
    saved = tmp_path / "saved.json"
    cache1 = tmp_path / "cache1"
    with mounted(ref, tmp_path / "m1", "--record-profile", *CHUNK, cache_dir=cache1) as m:
        _workload(m.path)
        out = _cli("profile", "save", str(m.path), str(saved))
        assert out.returncode == 0, out.stderr
        assert "entries written" in out.stdout
    doc = json.loads(saved.read_bytes())
    assert doc["schema"] == profile.SCHEMA
    paths = [e[0] for e in doc["entries"]]
    assert paths[:30] == [f"a/f{i:02}.txt" for i in range(30)]  # in the order read
    # a large file: the range read (and what the kernel read ahead of it), one entry, not the file
    [(big, start, length)] = doc["entries"][30:]
    assert (big, start) == ("m/big.bin", 0)
    assert 2 << 20 <= length < 6 << 20
    on_unmount = cache1 / "meta" / "profiles" / (doc["index_digest"].removeprefix("sha256:") + ".json")
    assert json.loads(on_unmount.read_bytes())["entries"] == doc["entries"]

    out = _cli("profile", "push", ref, str(saved))
    assert out.returncode == 0, out.stderr
    artifact = out.stdout.strip().rpartition("@")[2]
    out = _cli("inspect", ref, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert [(r["digest"], r["artifactType"]) for r in info["referrers"]] == [(artifact, profile.MEDIA_TYPE)]
    subject = Reference.parse(info["source"])
    assert subject.digest is not None
    lines = _log_text(logged_registry).splitlines()
    assert any(f'/referrers/{subject.digest} HTTP/1.1" 404' in x for x in lines)  # no referrers API here...
    tag = f'PUT /v2/prof/tree/manifests/{fallback_tag(subject.digest)} HTTP/1.1" 201'
    assert any(tag in x for x in lines)  # ... so the tag schema's index holds it
    out = _cli("inspect", ref)
    assert f"referrer      {artifact} {profile.MEDIA_TYPE}" in out.stdout

    data_digest = _data_digest(ref)
    before = _blob_gets(_log_text(logged_registry), data_digest)
    with mounted(ref, tmp_path / "m2", "--prefetch-profile", "auto", "-v", *CHUNK, cache_dir=tmp_path / "c2") as m:
        text = _wait_log(m, "entries used")
        assert "WARNING" not in text, text
        line = next(x for x in text.splitlines() if "entries used" in x)
        assert "31 entries used, 0 ignored" in line, line
        requests = int(line.rsplit(" in ", 1)[1].split()[0])
        # a/ (30 files, contiguous) and the first 2 MiB of big.bin (next to it): path order makes
        # them neighbours, so the prefetch is at most a couple of range requests, not 30+32 chunks
        assert 1 <= requests <= 2, line
        prefetched = _blob_gets(_log_text(logged_registry), data_digest)
        assert prefetched - before <= requests + 1  # + the mount's one range probe of a fresh cache
        _workload(m.path)  # everything it reads is in the cache now: no reader waits for the network
        status = _cli("status", str(m.path), "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["cache"]["misses"] == 0, status.stdout
    with mounted(ref, tmp_path / "m3", *CHUNK, cache_dir=tmp_path / "c3") as m:  # the same without it
        _workload(m.path)
        status = _cli("status", str(m.path), "--json")
        assert json.loads(status.stdout)["cache"]["misses"] > 0, status.stdout


def _hostile(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"{kind}.json"
    base = {"schema": profile.SCHEMA, "created": "2026-12-02T00:00:00Z", "index_digest": "sha256:" + "0" * 64}
    if kind == "huge":
        path.write_bytes(b" " * (profile.MAX_PROFILE_BYTES + 1))
    elif kind == "malformed":
        path.write_bytes(b'{"schema": "blobmount.prefetch-profile.v1", "entries": [[1, 2')
    elif kind == "elsewhere":
        path.write_text(json.dumps({**base, "entries": [["no/such/file", 0, 100], ["../../etc/passwd", 0, 10]]}))
    elif kind == "missing":
        pass
    return str(path)


@pytest.mark.parametrize("kind", ["huge", "malformed", "elsewhere", "missing"])
def test_a_hostile_profile_file_is_one_warning_and_the_mount_works(
    kind: str, pushed: dict[str, str], tmp_path: Path
) -> None:
    with mounted(pushed["basic"], tmp_path / "m", "--prefetch-profile", _hostile(tmp_path, kind)) as m:
        text = _wait_log(m, "prefetch profile")
        files = [p for p in m.path.rglob("*") if p.is_file()]
        assert files
        for p in files:
            p.read_bytes()
    warnings = [line for line in text.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, text
    assert "Traceback" not in text
    expected = {"huge": "larger than", "malformed": "not JSON", "elsewhere": "2 ignored", "missing": "No such file"}
    assert expected[kind] in warnings[0], warnings[0]


def test_a_hostile_published_profile_is_one_warning_and_none_published_is_none(
    logged_registry: Registry, tmp_path: Path
) -> None:
    ref = _push_tree(logged_registry, tmp_path)
    with mounted(ref, tmp_path / "m0", "--prefetch-profile", "auto", "-v") as m:
        text = _wait_log(m, "none published")
    assert "WARNING" not in text, text

    # a profile that `profile push` would refuse, published anyway by someone else's client
    out = _cli("inspect", ref, "--json")
    index_digest = json.loads(out.stdout)["index_digest"]
    garbage = b'{"schema": "blobmount.prefetch-profile.v1", "entries": "all of them"}'
    trio.run(push_profile, Reference.parse(ref), RegistryOptions(), garbage, "2099-01-01T00:00:00Z", 1, index_digest)
    with mounted(ref, tmp_path / "m1", "--prefetch-profile", "auto", *CHUNK) as m:
        text = _wait_log(m, "prefetch profile not used")
        _workload(m.path)
    warnings = [line for line in text.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, text
    assert "2099-01-01" in warnings[0], warnings[0]
    assert "created" in warnings[0], warnings[0]


def test_auto_looks_up_after_ready_and_a_stalled_lookup_never_holds_the_mount(
    registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    proxy = FaultProxy(registry.host)
    try:
        stall = proxy.add(Fault(Kind.STALL, match=path_prefix("/v2/fixtures/basic/referrers/")))
        ref = f"{proxy.host}/fixtures/basic:v1"
        with mounted(ref, tmp_path / "m", "--prefetch-profile", "auto", "--timeout", "2") as m:
            deadline = time.monotonic() + PREFETCH_WAIT_S
            while stall.hits == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stall.hits >= 1, "the referrers look-up was never sent"
            assert "prefetch profile" not in m.log()  # still waiting for the registry...
            files = [p for p in m.path.rglob("*") if p.is_file()]
            assert files
            for p in files:  # ... and the mount serves all the same
                p.read_bytes()
            refused = _cli("profile", "save", str(m.path), str(tmp_path / "p.json"))  # it records nothing
            assert refused.returncode == 1, refused
            assert refused.stderr.count("\n") == 1, refused.stderr
            assert "--record-profile" in refused.stderr
            text = _wait_log(m, "prefetch profile not used")
        warnings = [line for line in text.splitlines() if "WARNING" in line]
        assert len(warnings) == 1, text
    finally:
        proxy.stop()
