"""Mirrors in front of the real registry: pull-through caches (docker-registry in proxy mode) and
plain ones, tried in order (--mirror flags, then hosts.toml), falling back to the origin when a
mirror is down, lacks the content, or is a cold cache that cannot serve ranges yet; and never
handed the origin's credentials."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from blobmount.cli import main
from blobmount.create import CreateOptions, create_archive
from blobmount.reference import Reference
from blobmount.registry.auth import Credentials
from blobmount.registry.client import RegistryOptions
from blobmount.registry.push import push_archive
from blobmount.sources.remote import RegistryBlobSource, open_registry
from tests.support.helpers import FIXTURES, tree_files
from tests.support.mounts import mounted
from tests.support.registry_reads import read_streamed
from tests.support.servers import QuirkProxy, Registry, basic_auth_header, free_port, start_registry

WARM_WAIT_S = 30.0  # hang guard: a pull-through cache stores a 32 MiB blob in well under a second


@pytest.fixture
def mirror(registry: Registry, tmp_path: Path) -> Iterator[Registry]:
    """A pull-through cache (docker-registry in proxy mode) in front of the session registry."""
    reg = start_registry(tmp_path / "mirror", proxy_of=registry.host)
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def mirror2(registry: Registry, tmp_path: Path) -> Iterator[Registry]:
    reg = start_registry(tmp_path / "mirror2", proxy_of=registry.host)
    try:
        yield reg
    finally:
        reg.stop()


def _mirror_hits(mirror: Registry, repo: str = "fixtures") -> list[str]:
    log = (mirror.root / "registry.log").read_text(errors="replace")
    return [line for line in log.splitlines() if f'"GET /v2/{repo}/' in line or f'"HEAD /v2/{repo}/' in line]


def _hosts_toml(tmp_path: Path, registry: Registry, *hosts: tuple[str, list[str]]) -> Path:
    root = tmp_path / "certs.d"
    conf = root / registry.host
    conf.mkdir(parents=True)
    text = f'server = "http://{registry.host}"\n'
    for host, caps in hosts:
        text += f'\n[host."http://{host}"]\n  capabilities = {json.dumps(caps)}\n'
    (conf / "hosts.toml").write_text(text)
    return root


def test_reads_go_through_a_mirror_first(
    registry: Registry, mirror: Registry, pushed: dict[str, str], capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    files = tree_files("mixed")
    path, f = next(iter(files.items()))
    assert main(["cat", pushed["mixed"], os.fsdecode(path), "--mirror", mirror.host]) == 0
    assert capsysbinary.readouterr().out == f.data
    hits = _mirror_hits(mirror)
    assert any("/manifests/" in h for h in hits)
    assert any("/blobs/sha256:" in h for h in hits)


@pytest.mark.expect_log(r"^blobmount\.registry\.mirrors: mirror \S+ failed")
def test_a_dead_mirror_falls_back_to_the_next_and_the_origin(
    registry: Registry,
    mirror: Registry,
    pushed: dict[str, str],
    capsysbinary: pytest.CaptureFixture[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    path, f = next(iter(tree_files("basic").items()))
    with caplog.at_level(logging.WARNING):
        assert main(["cat", pushed["basic"], os.fsdecode(path), "--mirror", dead, "--mirror", mirror.host]) == 0
    assert capsysbinary.readouterr().out == f.data
    assert f"mirror {dead} failed" in caplog.text
    assert _mirror_hits(mirror)
    assert main(["cat", pushed["basic"], os.fsdecode(path), "--mirror", dead, "--timeout", "5"]) == 0
    assert capsysbinary.readouterr().out == f.data  # origin, after the dead mirror


@pytest.mark.expect_log(r"^blobmount\.registry\.mirrors: mirror \S+ failed")
def test_a_mirror_without_the_content_falls_back_to_the_origin(
    registry: Registry,
    pushed: dict[str, str],
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plain registry (not a cache) that lacks the repository answers 404: the origin serves."""
    empty = start_registry(tmp_path / "empty", access_log=True)
    try:
        path, f = next(iter(tree_files("unicode").items()))
        with caplog.at_level(logging.WARNING):
            assert main(["cat", pushed["unicode"], os.fsdecode(path), "--mirror", empty.host]) == 0
        assert capsysbinary.readouterr().out == f.data
        assert f"mirror {empty.host} failed" in caplog.text
        assert "no such tag or repository" in caplog.text
        assert any('" 404 ' in line for line in _mirror_hits(empty))
    finally:
        empty.stop()


@pytest.mark.expect_log(r"^blobmount\.registry\.mirrors: mirror \S+ failed")
def test_flag_mirrors_come_before_hosts_toml_mirrors(
    registry: Registry,
    mirror: Registry,
    mirror2: Registry,
    pushed: dict[str, str],
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    hosts = _hosts_toml(tmp_path, registry, (mirror2.host, ["pull", "resolve"]))
    path, f = next(iter(tree_files("mixed").items()))
    args = ["cat", pushed["mixed"], os.fsdecode(path), "--hosts-dir", str(hosts)]
    assert main([*args, "--mirror", mirror.host]) == 0
    assert capsysbinary.readouterr().out == f.data
    assert any("/manifests/" in h for h in _mirror_hits(mirror))
    # (the cold caches pass the range probe on, which is the next test's subject)
    assert not any("/manifests/" in h for h in _mirror_hits(mirror2))
    dead = f"127.0.0.1:{free_port()}"
    assert main([*args, "--mirror", dead]) == 0  # the flag's mirror is down: hosts.toml's is next
    assert capsysbinary.readouterr().out == f.data
    assert any("/manifests/" in h for h in _mirror_hits(mirror2))


def test_hosts_toml_mirrors(
    registry: Registry,
    mirror: Registry,
    pushed: dict[str, str],
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    hosts = _hosts_toml(tmp_path, registry, (mirror.host, ["pull", "resolve"]))
    path, f = next(iter(tree_files("unicode").items()))
    assert main(["cat", pushed["unicode"], os.fsdecode(path), "--hosts-dir", str(hosts)]) == 0
    assert capsysbinary.readouterr().out == f.data
    assert _mirror_hits(mirror)


def test_a_pull_only_mirror_is_never_asked_for_a_tag(
    registry: Registry,
    mirror: Registry,
    pushed: dict[str, str],
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    """containerd's capabilities: without "resolve" a mirror serves content by digest only."""
    hosts = _hosts_toml(tmp_path, registry, (mirror.host, ["pull"]))
    path, f = next(iter(tree_files("basic").items()))
    assert main(["cat", pushed["basic"], os.fsdecode(path), "--hosts-dir", str(hosts)]) == 0
    assert capsysbinary.readouterr().out == f.data
    hits = _mirror_hits(mirror)
    assert not any("/manifests/v1 " in h for h in hits)
    assert any("/manifests/sha256:" in h for h in hits)
    assert any("/blobs/sha256:" in h for h in hits)


@pytest.fixture
def big_archive(registry: Registry, tmp_path: Path) -> tuple[str, bytes]:
    """A 32 MiB uncompressed file pushed to the session registry: (reference, content)."""
    src = tmp_path / "big-src"
    src.mkdir()
    content = random.Random(9).randbytes(32 << 20)
    (src / "big.bin").write_bytes(content)
    create_archive(str(src), str(tmp_path / "big"), CreateOptions("none", 3))
    ref = Reference.parse(f"{registry.host}/mirrored/big:v1")
    trio.run(push_archive, tmp_path / "big", ref, RegistryOptions())
    return str(ref), content


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + WARM_WAIT_S
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_cold_pull_through_cache_sends_ranges_elsewhere_without_a_whole_download(
    registry: Registry,
    mirror: Registry,
    big_archive: tuple[str, bytes],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cache that has not stored the data blob answers the probe range with 200 and the whole
    blob: the client drops the connection after the status line (it takes a small part of the
    32 MiB), opens the archive from the origin, and uses the cache again once it has filled."""
    ref, content = big_archive
    counter = QuirkProxy(mirror.host)  # counts the body bytes the client really takes
    try:
        options = RegistryOptions(mirrors=(counter.host,))

        async def run() -> tuple[bytes, bytes, int]:
            archive = await open_registry(ref, options)
            source = archive.data
            assert isinstance(source, RegistryBlobSource)
            try:
                cold = await read_streamed(source, 1 << 20, (1 << 20) + 4096)
                taken = counter.state.body_bytes_sent
                await trio.to_thread.run_sync(_wait_for, mirror.blob_path(source.digest.hex))
                source.endpoints._down_until = [0.0] * len(source.endpoints.clients)  # back-off over
                before = len(counter.state.seen)
                warm = await read_streamed(source, 2 << 20, (2 << 20) + 4096)
                assert [m for m, p, h in counter.state.seen[before:]] == ["GET"]  # served by the cache
                return cold, warm, taken
            finally:
                await source.aclose()

        with caplog.at_level(logging.INFO):
            cold, warm, taken = trio.run(run)
    finally:
        counter.stop()
    assert cold == content[(1 << 20) : (1 << 20) + 4096]  # the only file starts the data blob
    assert warm == content[(2 << 20) : (2 << 20) + 4096]
    assert taken < len(content) // 4, taken
    assert "answers ranges with the whole blob" in caplog.text
    assert "failed" not in caplog.text  # not reported as a broken mirror


def test_a_cold_pull_through_cache_does_not_refuse_a_mount(
    registry: Registry, mirror: Registry, big_archive: tuple[str, bytes], tmp_path: Path
) -> None:
    ref, content = big_archive
    with mounted(ref, tmp_path / "mnt", "--mirror", mirror.host) as m, open(m.path / "big.bin", "rb") as f:
        assert os.pread(f.fileno(), 65536, 5 << 20) == content[5 << 20 : (5 << 20) + 65536]


@pytest.fixture
def no_stored_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.mark.expect_log(
    r"^blobmount\.registry\.mirrors: mirror \S+ failed", r"holds registry credentials but its mode is"
)
def test_a_mirror_never_gets_the_origins_credentials(
    auth_registry: Registry,
    no_stored_credentials: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The mirror asks for credentials (it relays the origin's basic challenge); neither
    --username nor the origin's entry in config.json may answer it: the origin serves instead."""
    ref = Reference.parse(f"{auth_registry.host}/sec/mirrored:v1")
    trio.run(push_archive, FIXTURES / "basic", ref, RegistryOptions(credentials=Credentials("alice", "s3cret pass")))
    spy = QuirkProxy(auth_registry.host)
    try:
        pw = tmp_path / "pw"
        pw.write_text("s3cret pass\n")
        flags = ["--mirror", spy.host]
        assert main(["ls", str(ref), *flags, "--username", "alice", "--password-file", str(pw)]) == 0
        assert "top.md" in capsys.readouterr().out
        docker = tmp_path / "docker"
        docker.mkdir()
        alice = {"auth": "YWxpY2U6czNjcmV0IHBhc3M="}  # alice:s3cret pass
        (docker / "config.json").write_text(json.dumps({"auths": {auth_registry.host: alice}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))
        assert main(["ls", str(ref), *flags]) == 0
        assert "top.md" in capsys.readouterr().out
        assert spy.state.seen  # the mirror was asked first ...
        assert all("authorization" not in h for _, _, h in spy.state.seen)  # ... and told nothing
        # credentials stored for the mirror's own host are what it gets
        bob = {"username": "bob", "password": "mirror pw"}
        (docker / "config.json").write_text(json.dumps({"auths": {auth_registry.host: alice, spy.host: bob}}))
        spy.state.seen.clear()
        assert main(["ls", str(ref), *flags]) == 0
        sent = {h.get("authorization") for _, _, h in spy.state.seen}
        assert basic_auth_header("bob", "mirror pw") in sent
        assert basic_auth_header("alice", "s3cret pass") not in sent
    finally:
        spy.stop()
