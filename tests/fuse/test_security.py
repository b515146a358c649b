"""Security properties of a live mount: read-only, nosuid, nodev; allow_other only on request and
then with default_permissions; no setuid/setgid bit reaches a file, whatever the archive or the
owner override says; credentials reach neither the daemon's log (even at debug level, FUSE debug
included) nor its command line or environment."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.corpus import Spec, write_archive
from tests.support.faults import FaultProxy
from tests.support.helpers import FIXTURES, tree_files
from tests.support.mounts import Mount, mounted, push_dir
from tests.support.servers import Registry, start_registry

pytestmark = pytest.mark.fuse

BASIC = f"dir:{FIXTURES / 'basic'}"
USER, PASSWORD = "carol", "pw-never-logged-7f3a"


def _mountinfo(path: Path) -> tuple[set[str], set[str]]:
    """(per-mount options, superblock options) of the mount at `path`."""
    target = os.path.realpath(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == target:
            sep = fields.index("-")
            return set(fields[5].split(",")), set(fields[sep + 3].split(","))
    raise AssertionError(f"{path} is not mounted")


def test_mount_is_read_only_nosuid_nodev_without_allow_other(tmp_path: Path) -> None:
    with mounted(BASIC, tmp_path / "mnt") as m:
        opts, sb = _mountinfo(m.path)
        assert {"ro", "nosuid", "nodev"} <= opts
        assert "ro" in sb
        assert "allow_other" not in sb
        assert "default_permissions" in sb


def test_suid_and_dev_options_cannot_undo_nosuid_nodev(tmp_path: Path) -> None:
    """mount(8) passes its generic options along; `suid`, `dev`, `rw` are accepted and ignored."""
    with mounted(BASIC, tmp_path / "mnt", "-o", "suid,dev,rw,exec") as m:
        opts, _ = _mountinfo(m.path)
        assert {"ro", "nosuid", "nodev"} <= opts


def test_allow_other_comes_with_default_permissions(tmp_path: Path) -> None:
    with mounted(BASIC, tmp_path / "mnt", "-o", "allow_other") as m:
        opts, sb = _mountinfo(m.path)
        assert {"allow_other", "default_permissions"} <= sb
        assert {"ro", "nosuid", "nodev"} <= opts


@pytest.mark.parametrize("owner", [(), ("--uid", "0", "--gid", "0"), ("--uid", "1234", "--gid", "4321")])
def test_no_file_gains_setuid_setgid_or_sticky(owner: tuple[str, ...], tmp_path: Path) -> None:
    arc = tmp_path / "arc"
    modes = {b"suid": 0o4755, b"sgid": 0o2755, b"sticky": 0o1777, b"all": 0o7777, b"typed": 0o104755}
    write_archive(arc, [Spec(name, b"#!/bin/sh\n", mode=mode) for name, mode in modes.items()])
    with mounted(f"dir:{arc}", tmp_path / "mnt", *owner) as m:
        for name, mode in modes.items():
            st = os.stat(m.path / os.fsdecode(name))
            assert stat.S_ISREG(st.st_mode), name
            assert st.st_mode & 0o7000 == 0, (name, oct(st.st_mode))
            assert stat.S_IMODE(st.st_mode) == mode & 0o777, name


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[Registry]:
    reg = start_registry(tmp_path / "authreg", user=USER, password=PASSWORD)
    try:
        yield reg
    finally:
        reg.stop()


def _secrets() -> list[str]:
    return [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]


def _assert_no_secret(m: Mount, extra: tuple[str, ...] = ()) -> None:
    pid = m.proc.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    log = m.log()
    for secret in (*_secrets(), *extra):
        assert secret not in cmdline
        assert secret not in environ
        assert secret not in log, f"secret in the daemon log:\n{log}"


def test_credentials_never_in_log_cmdline_or_environment(auth_registry: Registry, tmp_path: Path) -> None:
    """--password-file at debug level (-d: our DEBUG logs and libfuse's request trace)."""
    import trio

    from blobmount.reference import Reference
    from blobmount.registry.auth import Credentials
    from blobmount.registry.client import RegistryOptions
    from blobmount.registry.push import push_archive

    ref = Reference.parse(f"{auth_registry.host}/sec/mounted:v1")
    trio.run(push_archive, FIXTURES / "basic", ref, RegistryOptions(credentials=Credentials(USER, PASSWORD)))
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    with mounted(str(ref), tmp_path / "mnt", "-d", "--username", USER, "--password-file", str(pw)) as m:
        assert (m.path / "top.md").read_bytes() == tree_files("basic")[b"top.md"].data
        _assert_no_secret(m)
        assert "DEBUG" in m.log()  # the log really was at debug level


def test_bearer_tokens_never_in_the_log(registry: Registry, tmp_path: Path) -> None:
    """Tokens are credentials too: a bearer-token registry (the proxy's /token), at debug level."""
    ref_path = push_dir(registry, FIXTURES / "basic", "sec/bearer")
    repo = ref_path.split("/", 1)[1]
    proxy = FaultProxy(registry.host)
    proxy.state.bearer = True
    docker = tmp_path / "docker"
    docker.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (docker / "config.json").write_text(f'{{"auths": {{"{proxy.host}": {{"auth": "{auth}"}}}}}}')
    (docker / "config.json").chmod(0o600)
    env = dict(os.environ, DOCKER_CONFIG=str(docker))
    try:
        with mounted(f"{proxy.host}/{repo}", tmp_path / "mnt", "-d", env=env) as m:
            assert (m.path / "top.md").read_bytes() == tree_files("basic")[b"top.md"].data
            assert proxy.state.tokens_issued >= 1
            tokens = tuple(f"tok{i}" for i in range(1, proxy.state.tokens_issued + 1))
            token_requests = [h for _, p, h in proxy.state.seen if p.startswith("/token")]
            assert any(h.get("authorization") == f"Basic {auth}" for h in token_requests)  # creds were used
            log = m.log()
            for token in tokens:
                assert token not in log
            _assert_no_secret(m)
    finally:
        proxy.stop()
