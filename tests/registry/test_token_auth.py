"""Bearer tokens against a real docker-registry configured with `auth: token` (realm, service,
issuer, rootcertbundle): the test suite's issuer signs RS256 JWTs the registry verifies, so every
token here is checked by the real server, expiry included."""

from __future__ import annotations

import json
import os
import random
import threading
import time
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
from tests.support.servers import TOKEN_PASSWORD, TOKEN_USER, Registry, TokenIssuer, access_log_mark, statuses_since


def issuer_of(reg: Registry) -> TokenIssuer:
    assert reg.token is not None
    return reg.token


@pytest.fixture
def no_stored_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ~/.docker/config.json or auth.json of the machine may leak into a test."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)


def test_anonymous_pull_gets_a_pull_only_token(
    token_registry: Registry, no_stored_credentials: None, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    issuer = issuer_of(token_registry)
    path, f = next(iter(tree_files("basic").items()))
    assert main(["cat", f"{token_registry.host}/tok/basic:v1", os.fsdecode(path)]) == 0
    assert capsysbinary.readouterr().out == f.data
    assert issuer.state.issued
    for subject, access, _ in issuer.state.issued:
        assert subject == ""
        assert json.loads(access) == [{"type": "repository", "name": "tok/basic", "actions": ["pull"]}]
    requests = issuer.state.requests
    assert all("authorization" not in headers for _, _, headers in requests)
    assert all("service=blobmount-test" in path for _, path, _ in requests)


@pytest.mark.expect_log(r"holds registry credentials but its mode is")
def test_push_without_credentials_is_refused_then_pushes_with_them(
    token_registry: Registry, no_stored_credentials: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = f"{token_registry.host}/tok/pushed:v1"
    assert main(["push", "--archive", str(FIXTURES / "basic"), ref]) == 6
    err = capsys.readouterr().err
    assert "no credentials found" in err
    assert len(err.strip().splitlines()) == 1
    pw = tmp_path / "pw"
    pw.write_text(TOKEN_PASSWORD + "\n")
    assert (
        main(["push", "--archive", str(FIXTURES / "basic"), ref, "--username", TOKEN_USER, "--password-file", str(pw)])
        == 0
    )
    assert capsys.readouterr().out.strip().startswith(f"{token_registry.host}/tok/pushed@sha256:")
    granted = [json.loads(access) for subject, access, _ in issuer_of(token_registry).state.issued if subject]
    assert {"type": "repository", "name": "tok/pushed", "actions": ["pull", "push"]} in [a[0] for a in granted]


@pytest.mark.expect_log(r"holds registry credentials but its mode is")
def test_a_wrong_password_is_refused_at_the_token_endpoint(
    token_registry: Registry, no_stored_credentials: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("not the password\n")
    assert (
        main(["ls", f"{token_registry.host}/tok/basic:v1", "--username", TOKEN_USER, "--password-file", str(pw)]) == 6
    )
    err = capsys.readouterr().err
    assert f"token endpoint 127.0.0.1:{issuer_of(token_registry).port} refused the credentials (401)" in err
    assert "not the password" not in err


@pytest.mark.parametrize("answer", [("token",), ("access_token",), ("token", "access_token")])
@pytest.mark.parametrize("expires_in", [300, None])
def test_token_and_access_token_answers(
    token_registry: Registry,
    no_stored_credentials: None,
    answer: tuple[str, ...],
    expires_in: int | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    issuer = issuer_of(token_registry)
    issuer.state.answer = answer
    issuer.state.expires_in = expires_in
    assert main(["ls", f"{token_registry.host}/tok/basic:v1"]) == 0
    assert "top.md" in capsys.readouterr().out
    assert len(issuer.state.issued) == 1  # one token for resolve, manifest, index and probe


def test_a_token_endpoint_that_fails_is_a_clear_error(
    token_registry: Registry, no_stored_credentials: None, capsys: pytest.CaptureFixture[str]
) -> None:
    issuer = issuer_of(token_registry)
    ref = f"{token_registry.host}/tok/basic:v1"
    where = f"token endpoint 127.0.0.1:{issuer.port}"
    issuer.state.fail_next = [404]
    assert main(["ls", ref]) == 6
    err = capsys.readouterr().err
    assert f"{where} answered 404" in err
    assert len(err.strip().splitlines()) == 1
    issuer.state.body = b"<html>login</html>"
    assert main(["ls", ref]) == 6
    assert f"{where} answered something that is not JSON" in capsys.readouterr().err
    issuer.state.body = b'{"expires_in": 300}'
    assert main(["ls", ref]) == 6
    assert f"{where} answered no token" in capsys.readouterr().err
    issuer.state.body = None
    issuer.state.fail_next = [503, 502]  # a passing outage is retried with backoff
    assert main(["ls", ref]) == 0
    assert "top.md" in capsys.readouterr().out


def _two_reads(reg: Registry, pause_s: float) -> tuple[bytes, list[int], int]:
    """Open tok/mixed, read a range, wait, read another; the registry's statuses for the reads."""
    blob = (FIXTURES / "mixed" / "data.blob").read_bytes()

    async def run() -> tuple[bytes, list[int], int]:
        archive = await open_registry(f"{reg.host}/tok/mixed:v1", RegistryOptions())
        source = archive.data
        assert isinstance(source, RegistryBlobSource)
        try:
            first = await read_streamed(source, 100, 5000)
            mark = access_log_mark(reg)
            issued = len(issuer_of(reg).state.issued)
            await trio.sleep(pause_s)
            second = await read_streamed(source, 5000, 9000)
        finally:
            await source.aclose()
        return first + second, statuses_since(reg, mark), len(issuer_of(reg).state.issued) - issued

    data, statuses, refreshes = trio.run(run)
    assert data == blob[100:9000]
    return data, statuses, refreshes


def test_a_token_is_refreshed_before_it_expires(token_registry: Registry, no_stored_credentials: None) -> None:
    """expires_in tells the truth (the registry accepts the token a little longer): the client
    fetches a new one ahead of time and the registry never sees an expired token."""
    issuer = issuer_of(token_registry)
    issuer.state.expires_in = 4  # refreshed after 3 s (a quarter of its life as margin)
    issuer.state.lifetime_s = 5
    _, statuses, refreshes = _two_reads(token_registry, 3.5)
    assert statuses == [206]
    assert refreshes == 1


def test_a_token_the_registry_refuses_early_is_refreshed_on_401(
    token_registry: Registry, no_stored_credentials: None
) -> None:
    """expires_in says 300 s but the registry refuses the token after 2 s: the 401 triggers a new
    token and the read still succeeds."""
    issuer = issuer_of(token_registry)
    issuer.state.lifetime_s = 2
    _, statuses, refreshes = _two_reads(token_registry, 2.5)
    assert statuses == [401, 206]
    assert refreshes == 1


def test_identity_token_from_a_credential_helper_uses_the_oauth2_refresh_flow(
    token_registry: Registry,
    no_stored_credentials: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    issuer = issuer_of(token_registry)
    issuer.state.refresh_tokens["refresh-7f3a"] = TOKEN_USER
    issuer.state.answer = ("access_token",)  # what OAuth2 token endpoints answer
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nprintf \'{"ServerURL":"x","Username":"<token>","Secret":"refresh-7f3a"}\'\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"credHelpers": {token_registry.host: "fake"}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    assert main(["push", "--archive", str(FIXTURES / "basic"), f"{token_registry.host}/tok/oauth:v1"]) == 0
    capsys.readouterr()
    posts = [(path, h) for method, path, h in issuer.state.requests if method == "POST"]
    assert posts
    assert all("authorization" not in h for _, h in posts)  # the refresh token goes in the form only
    assert {subject for subject, _, _ in issuer.state.issued} == {TOKEN_USER}


def test_mounted_reads_in_flight_survive_token_expiry(
    token_registry: Registry, no_stored_credentials: None, tmp_path: Path
) -> None:
    """Four threads keep reading a mounted 32 MiB file while the registry refuses each token 2 s
    after it was issued (the answer claims 300 s): every read returns the right bytes, and each
    expiry costs one token, not one per waiting read (the refresh is single-flight)."""
    issuer = issuer_of(token_registry)
    src = tmp_path / "src"
    src.mkdir()
    content = random.Random(4).randbytes(32 << 20)
    (src / "big.bin").write_bytes(content)
    create_archive(str(src), str(tmp_path / "arc"), CreateOptions("none", 3))
    ref = Reference.parse(f"{token_registry.host}/tok/inflight:v1")
    options = RegistryOptions(credentials=Credentials(TOKEN_USER, TOKEN_PASSWORD))
    trio.run(push_archive, tmp_path / "arc", ref, options)
    issuer.state.lifetime_s = 2
    piece = 64 << 10
    offsets = list(range(0, len(content), piece))
    random.Random(5).shuffle(offsets)
    errors: list[str] = []
    # 64 KiB chunks: each of these reads needs its own fetch (with 1 MiB chunks the cache would
    # soon hold the whole file and the later reads would never meet an expired token)
    with mounted(str(ref), tmp_path / "mnt", "--chunk-size", "64K") as m:
        before = len(issuer.state.issued)
        started = time.monotonic()

        def reader(mine: list[int]) -> None:
            with open(m.path / "big.bin", "rb") as f:
                for offset in mine:
                    got = os.pread(f.fileno(), piece, offset)
                    if got != content[offset : offset + piece]:
                        errors.append(f"wrong bytes at {offset}")
                    time.sleep(0.11)  # 45 reads span over 2 token lifetimes

        threads = [threading.Thread(target=reader, args=(offsets[i::4][:45],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - started
        log = m.log()
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    refreshes = len(issuer.state.issued) - before
    assert elapsed > 2 * issuer.state.lifetime_s  # the reads outlived the mount's first token
    assert 2 <= refreshes <= elapsed / issuer.state.lifetime_s + 2, (refreshes, elapsed, log)


def test_the_daemon_reads_with_the_token_fetched_while_mounting(
    token_registry: Registry, no_stored_credentials: None, tmp_path: Path
) -> None:
    """The mount fetched a token to open the archive; the first read starts with it (no 401 and no
    token round trip before the first byte)."""
    issuer = issuer_of(token_registry)
    files = tree_files("mixed")
    with mounted(f"{token_registry.host}/tok/mixed:v1", tmp_path / "mnt") as m:
        mark = access_log_mark(token_registry)
        before = len(issuer.state.issued)
        for path, f in list(files.items())[:5]:
            assert (m.path / os.fsdecode(path)).read_bytes() == f.data
        statuses = statuses_since(token_registry, mark)
    assert statuses
    assert 401 not in statuses
    assert len(issuer.state.issued) == before
