"""A tag mounted again while its registry is down: the cache remembers what the tag resolved to
(and holds the manifest, the index and the chunks read), so the mount goes ahead from there with
one warning naming the digest and when it was resolved; `--no-stale-tag` (`-o no_stale_tag`,
``BLOBMOUNT_NO_STALE_TAG``) refuses instead, in one line. The registry is a real docker-registry
of the test's own, stopped so that its address, part of the cache's key, stays the same."""

from __future__ import annotations

import functools
import os
import subprocess
import time
from pathlib import Path

import pytest
import trio

from blobmount.reference import Reference
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from tests.support.faults import Fault, FaultProxy, Kind
from tests.support.helpers import FIXTURES, tree_files
from tests.support.mounts import blobmount_cmd, is_mounted, mounted, unmount
from tests.support.servers import Registry

pytestmark = pytest.mark.fuse

TIMEOUT = ("--timeout", "2")
RUN_GUARD_S = 60.0


def _push(reg: Registry) -> tuple[str, str]:
    ref = Reference.parse(f"{reg.host}/stale/basic:v1")
    digest = trio.run(functools.partial(push_archive, FIXTURES / "basic", ref, RegistryOptions()))
    return str(ref), str(digest)


def _read_all(root: Path) -> None:
    for rel, f in tree_files("basic").items():
        assert (root / os.fsdecode(rel)).read_bytes() == f.data, rel


def test_a_tag_mounts_from_its_cached_resolution_while_the_registry_is_down(
    own_registry: Registry, tmp_path: Path
) -> None:
    ref, digest = _push(own_registry)
    cache = tmp_path / "cache"
    with mounted(ref, tmp_path / "m1", *TIMEOUT, cache_dir=cache) as m:
        _read_all(m.path)  # every byte is in the cache now
    resolved = time.time()
    own_registry.stop()

    with mounted(ref, tmp_path / "m2", *TIMEOUT, cache_dir=cache) as m:
        _read_all(m.path)
        log = m.log()
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, log
    assert digest in warnings[0]
    assert "does not answer" in warnings[0]
    assert time.strftime("%Y-%m-%d", time.gmtime(resolved)) in warnings[0]  # when it was resolved
    assert "Traceback" not in log

    # in the background, as people run it: the one warning is what the terminal shows
    mnt = tmp_path / "m3"
    mnt.mkdir()
    try:
        out = subprocess.run(
            blobmount_cmd(ref, str(mnt), *TIMEOUT, "--cache-dir", str(cache)),
            capture_output=True,
            text=True,
            timeout=RUN_GUARD_S,
        )
        assert out.returncode == 0, out.stderr
        assert out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith("blobmount: WARNING: ")
        assert digest in out.stderr
        _read_all(mnt)
    finally:
        unmount(mnt)


def test_a_stalled_registry_costs_one_timeout_then_the_cached_resolution(
    own_registry: Registry, tmp_path: Path
) -> None:
    """A registry that accepts the lookup and never answers: after one --timeout the tag's cached
    resolution is mounted (waiting for the open's whole budget, 4x, would have failed the mount)."""
    _, digest = _push(own_registry)
    proxy = FaultProxy(own_registry.host)
    try:
        ref = f"{proxy.host}/stale/basic:v1"
        cache = tmp_path / "cache"
        with mounted(ref, tmp_path / "m1", *TIMEOUT, cache_dir=cache) as m:
            _read_all(m.path)
        stall = proxy.add(Fault(Kind.STALL))
        with mounted(ref, tmp_path / "m2", *TIMEOUT, cache_dir=cache) as m:
            _read_all(m.path)
            log = m.log()
        assert stall.hits >= 1
        warnings = [line for line in log.splitlines() if "WARNING" in line]
        assert len(warnings) == 1, log
        assert digest in warnings[0]
        assert "no answer within --timeout" in warnings[0]
    finally:
        proxy.stop()


@pytest.mark.parametrize("refuse", [("--no-stale-tag",), ("-o", "no_stale_tag"), ("env",)])
def test_no_stale_tag_refuses_in_one_line(refuse: tuple[str, ...], own_registry: Registry, tmp_path: Path) -> None:
    ref, digest = _push(own_registry)
    cache = tmp_path / "cache"
    with mounted(ref, tmp_path / "m1", *TIMEOUT, cache_dir=cache) as m:
        _read_all(m.path)
    own_registry.stop()
    mnt = tmp_path / "m2"
    mnt.mkdir()
    env = {**os.environ, "BLOBMOUNT_NO_STALE_TAG": "1"} if refuse == ("env",) else None
    args = () if refuse == ("env",) else refuse
    try:
        out = subprocess.run(
            blobmount_cmd(ref, str(mnt), *TIMEOUT, "--cache-dir", str(cache), *args),
            capture_output=True,
            text=True,
            timeout=RUN_GUARD_S,
            env=env,
        )
    finally:
        unmount(mnt)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("blobmount: "), out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert digest in out.stderr
    assert "--no-stale-tag" in out.stderr
    assert not is_mounted(mnt)


def test_without_a_cached_resolution_the_mount_fails_in_one_line(own_registry: Registry, tmp_path: Path) -> None:
    """The control: a cache that never saw the tag has nothing to fall back on."""
    ref, _ = _push(own_registry)
    own_registry.stop()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        out = subprocess.run(
            blobmount_cmd(ref, str(mnt), *TIMEOUT, "--cache-dir", str(tmp_path / "cold")),
            capture_output=True,
            text=True,
            timeout=RUN_GUARD_S,
        )
    finally:
        unmount(mnt)
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert own_registry.host in out.stderr
    assert not is_mounted(mnt)
