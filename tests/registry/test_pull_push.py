"""Against a real docker-registry: push, resolve, pull, and the registry behaviours we must survive."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import trio

from blobmount.cache import CacheDir
from blobmount.cli import main
from blobmount.errors import AuthError, LimitExceeded
from blobmount.reference import Digest, Reference
from blobmount.registry.auth import Credentials
from blobmount.registry.client import RegistryOptions
from blobmount.sources.local import LocalFileSource
from blobmount.sources.remote import RegistryArchive, RegistryBlobSource, open_registry
from tests.support.helpers import FIXTURE_NAMES, FIXTURES, tree_files
from tests.support.registry_reads import read_streamed
from tests.support.servers import QuirkProxy, Registry


def test_push_is_byte_identical_to_the_reference_manifest(registry: Registry, pushed: dict[str, str]) -> None:
    for name in FIXTURE_NAMES:
        manifest = (FIXTURES / name / "oci-manifest.json").read_bytes()
        assert pushed[name + "@"].endswith("@sha256:" + hashlib.sha256(manifest).hexdigest()), name


@pytest.mark.parametrize("key", ["basic", "basic@", "unicode", "mixed"])
def test_cat_by_reference(key: str, pushed: dict[str, str], capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    name = key.rstrip("@")
    for path, f in list(tree_files(name).items())[:25]:
        assert main(["cat", pushed[key], os.fsdecode(path)]) == 0
        assert capsysbinary.readouterr().out == f.data


def test_inspect_by_reference(pushed: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", pushed["mixed"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == 300
    assert info["data_size"] == (FIXTURES / "mixed" / "data.blob").stat().st_size


def test_unknown_tag_and_bad_reference(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", f"{registry.host}/fixtures/basic:nope"]) == 3
    assert "nope" in capsys.readouterr().err
    assert main(["ls", f"{registry.host}/Fixtures/basic"]) == 2


def test_push_tree_then_read_back(
    registry: Registry, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big.bin").write_bytes(os.urandom(3 << 20))
    (src / "small.txt").write_text("hello\n")
    ref = f"{registry.host}/pushed/tree:v1"
    assert main(["push", str(src), ref]) == 0
    digest_line = capsysbinary.readouterr().out.decode().strip()
    assert "@sha256:" in digest_line
    assert main(["cat", ref, "d/big.bin"]) == 0
    assert capsysbinary.readouterr().out == (src / "d" / "big.bin").read_bytes()
    # a second push of the same tree uploads no blob again and yields the same digest
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    try:
        assert main(["push", str(src), ref]) == 0
        first = capsysbinary.readouterr().out
        assert main(["push", str(src), ref]) == 0
        assert capsysbinary.readouterr().out == first
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]


def test_range_reads_fetch_only_what_is_asked(pushed: dict[str, str]) -> None:
    async def run() -> tuple[bytes, int, int]:
        archive = await open_registry(pushed["mixed"], RegistryOptions())
        source = archive.data
        assert isinstance(source, RegistryBlobSource)
        data = await read_streamed(source, 1000, 1000 + 4096)
        stats = source.client.stats
        await source.aclose()
        return data, stats.requests, stats.bytes_fetched

    data, requests, fetched = trio.run(run)
    assert data == (FIXTURES / "mixed" / "data.blob").read_bytes()[1000:5096]
    assert requests == 1
    assert fetched == 4096


@pytest.mark.expect_log(r"holds registry credentials but its mode is", r"the registry ignores range requests")
def test_basic_auth(
    auth_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = Reference.parse(f"{auth_registry.host}/sec/basic:v1")
    with pytest.raises(AuthError):
        trio.run(_push, ref, RegistryOptions())
    creds = Credentials("alice", "s3cret pass")
    trio.run(_push, ref, RegistryOptions(credentials=creds))
    monkeypatch.setenv("HOME", str(tmp_path))  # no stray ~/.docker/config.json
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert main(["ls", str(ref)]) == 6
    err = capsys.readouterr().err
    assert "s3cret" not in err
    pw = tmp_path / "pw"
    pw.write_text("s3cret pass\n")
    assert main(["ls", str(ref), "--username", "alice", "--password-file", str(pw)]) == 0
    assert "top.md" in capsys.readouterr().out
    docker = tmp_path / "docker"
    docker.mkdir()
    auth = {"auths": {auth_registry.host: {"auth": "YWxpY2U6czNjcmV0IHBhc3M="}}}  # alice:s3cret pass
    (docker / "config.json").write_text(json.dumps(auth))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    assert main(["ls", str(ref)]) == 0
    assert "top.md" in capsys.readouterr().out


async def _push(ref: Reference, options: RegistryOptions) -> Digest:
    from blobmount.registry.push import push_archive

    return await push_archive(FIXTURES / "basic", ref, options, created="2024-01-02T03:04:05Z")


def _read_through(proxy: QuirkProxy, name: str, start: int, end: int, **kw: object) -> bytes:
    async def run() -> bytes:
        archive = await open_registry(f"{proxy.host}/fixtures/{name}:v1", RegistryOptions(**kw))  # type: ignore[arg-type]
        source = archive.data
        assert isinstance(source, RegistryBlobSource)
        data = await read_streamed(source, start, end)
        data += await read_streamed(source, end, end + 100)
        await source.aclose()
        return data

    return trio.run(run)


def test_bearer_token_challenge(quirk_proxy: QuirkProxy) -> None:
    quirk_proxy.state.bearer = True
    data = _read_through(quirk_proxy, "mixed", 10, 5000)
    assert data == (FIXTURES / "mixed" / "data.blob").read_bytes()[10:5100]
    assert quirk_proxy.state.tokens_issued >= 1
    scopes = [p for m, p, h in quirk_proxy.state.seen if p.startswith("/token")]
    assert all("scope=repository%3Afixtures%2Fmixed%3Apull" in p for p in scopes)


def test_redirect_to_storage_without_credentials_and_reused(quirk_proxy: QuirkProxy) -> None:
    quirk_proxy.state.bearer = True
    quirk_proxy.state.redirect_blobs = True
    data = _read_through(quirk_proxy, "mixed", 0, 70000)
    assert data == (FIXTURES / "mixed" / "data.blob").read_bytes()[:70100]
    storage = [h for m, p, h in quirk_proxy.state.seen if p.startswith("/storage")]
    assert storage
    assert all("authorization" not in h for h in storage)


def test_429_with_retry_after_then_success(quirk_proxy: QuirkProxy) -> None:
    quirk_proxy.state.retry_after = "0"
    quirk_proxy.state.fail_next = [429, 503]
    data = _read_through(quirk_proxy, "basic", 0, 100)
    assert data == (FIXTURES / "basic" / "data.blob").read_bytes()[:200]


@pytest.mark.expect_log(r"the registry ignores range requests; downloading the whole")
def test_200_for_ranges_falls_back_to_a_verified_whole_blob(
    quirk_proxy: QuirkProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    quirk_proxy.state.ignore_ranges = True
    spec = f"{quirk_proxy.host}/fixtures/mixed:v1"
    for sub in ("c1", "c2"):
        (tmp_path / sub).mkdir(mode=0o700)
    with pytest.raises(LimitExceeded, match="ignores range requests"):
        trio.run(_open, spec, tmp_path / "c1", 1 << 20)
    with caplog.at_level(logging.WARNING):
        archive = trio.run(_open, spec, tmp_path / "c2", 1 << 30)
    assert "downloading the whole" in caplog.text
    blob = (FIXTURES / "mixed" / "data.blob").read_bytes()
    assert isinstance(archive.data, LocalFileSource)
    assert trio.run(archive.data.read_range, 5, 500) == blob[5:500]


async def _open(spec: str, cache: Path, size: int) -> RegistryArchive:
    return await open_registry(spec, RegistryOptions(), cache=CacheDir(cache, size))


def test_empty_archive_sends_no_range_request(quirk_proxy: QuirkProxy) -> None:
    trio.run(_open, f"{quirk_proxy.host}/fixtures/empty:v1", Path("/nonexistent-never-used"), 0) if False else None

    async def run() -> None:
        await open_registry(f"{quirk_proxy.host}/fixtures/empty:v1", RegistryOptions())

    trio.run(run)
    assert not [h for m, p, h in quirk_proxy.state.seen if "range" in h]


@pytest.mark.expect_log(r"holds registry credentials but its mode is")
def test_credential_helper_and_auth_json(
    auth_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = Reference.parse(f"{auth_registry.host}/sec/helper:v1")
    trio.run(_push, ref, RegistryOptions(credentials=Credentials("alice", "s3cret pass")))
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-fake"
    seen = tmp_path / "helper-saw"
    helper.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = get ] || exit 1\ncat > {seen}\n'
        'printf \'{"ServerURL":"x","Username":"alice","Secret":"s3cret pass"}\'\n'
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"credHelpers": {auth_registry.host: "fake"}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    assert main(["ls", str(ref)]) == 0
    assert "top.md" in capsys.readouterr().out
    assert seen.read_text() == auth_registry.host
    # containers' auth.json is looked up first when $REGISTRY_AUTH_FILE names it
    monkeypatch.delenv("DOCKER_CONFIG")
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {auth_registry.host: {"auth": "YWxpY2U6czNjcmV0IHBhc3M="}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(authfile))
    assert main(["ls", str(ref)]) == 0
    assert "top.md" in capsys.readouterr().out


def test_password_stdin(
    auth_registry: Registry, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    ref = Reference.parse(f"{auth_registry.host}/sec/stdin:v1")
    trio.run(_push, ref, RegistryOptions(credentials=Credentials("alice", "s3cret pass")))
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret pass\n"))
    assert main(["ls", str(ref), "--username", "alice", "--password-stdin"]) == 0
    assert "top.md" in capsys.readouterr().out
    assert main(["ls", str(ref), "--password-stdin"]) == 2  # a password without a user is a usage error
