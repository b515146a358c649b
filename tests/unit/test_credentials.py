"""Where credentials may go: files holding them must be private (else a warning, once), redirects
never carry them to another host or over a downgraded scheme, and argv cannot hold a password."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import httpx
import pytest
import trio

from blobmount.cli import main
from blobmount.reference import Digest, Reference
from blobmount.registry import auth
from blobmount.registry.auth import Credentials, find_credentials, read_password_file
from blobmount.registry.client import RegistryClient, RegistryOptions

SECRET = "s3cret-in-a-file"
BLOB = bytes(range(256)) * 4
DIGEST = Digest.of(BLOB)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(auth, "_warned_modes", set())
    (tmp_path / ".docker").mkdir()
    return tmp_path


def _config(home: Path, doc: object, mode: int) -> Path:
    path = home / ".docker" / "config.json"
    path.write_text(json.dumps(doc))
    path.chmod(mode)
    return path


AUTHS = {"auths": {"registry.test": {"auth": base64.b64encode(f"u:{SECRET}".encode()).decode()}}}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o666])
@pytest.mark.expect_log("holds registry credentials but its mode is")
def test_a_readable_credentials_file_is_warned_about_once(
    mode: int, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _config(home, AUTHS, mode)
    with caplog.at_level(logging.WARNING, logger="blobmount"):
        for _ in range(3):
            assert find_credentials("registry.test") == Credentials("u", SECRET)
    warnings = [r.getMessage() for r in caplog.records if "chmod 600" in r.getMessage()]
    assert warnings == [f"{path} holds registry credentials but its mode is {mode:04o}; make it 0600 (chmod 600)"]
    assert SECRET not in caplog.text


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_credentials_file_is_not_warned_about(
    mode: int, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _config(home, AUTHS, mode)
    with caplog.at_level(logging.WARNING, logger="blobmount"):
        assert find_credentials("registry.test") is not None
    assert "chmod" not in caplog.text


def test_a_file_without_secrets_for_us_is_not_warned_about(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A world-readable config.json that names only other registries holds nothing of ours."""
    _config(home, {"auths": {"elsewhere.test": {"auth": "eDp5"}}}, 0o644)
    with caplog.at_level(logging.WARNING, logger="blobmount"):
        assert find_credentials("registry.test") is None
    assert "chmod" not in caplog.text


@pytest.mark.expect_log("holds registry credentials but its mode is")
def test_a_readable_password_file_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pw"
    path.write_text(SECRET + "\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="blobmount"):
        assert read_password_file(path) == SECRET
    assert "chmod 600" in caplog.text
    assert SECRET not in caplog.text


def test_no_flag_takes_a_password_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "registry.test/a/b:v1", "--username", "u", "--password", SECRET]) == 2
    assert main(["ls", "registry.test/a/b:v1", "--username", "u"]) == 2  # needs stdin or a file
    capsys.readouterr()


def _redirecting(location: str, seen: list[httpx.Request]) -> httpx.MockTransport:
    """A registry demanding basic auth that redirects blob GETs to `location`."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "registry.test" and request.url.scheme == "https" and request.url.port is None:
            if "authorization" not in request.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
            return httpx.Response(307, headers={"Location": location})
        first, last = (int(x) for x in request.headers["range"].removeprefix("bytes=").split("-"))
        return httpx.Response(
            206, headers={"Content-Range": f"bytes {first}-{last}/{len(BLOB)}"}, content=BLOB[first : last + 1]
        )

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    "location",
    [
        "https://storage.test/blob?sig=1",  # another host
        "https://registry.test:8443/blob",  # the same name, another port
        "http://registry.test/blob",  # the same name over plain HTTP: a downgrade
        "//storage.test/blob",  # scheme-relative
    ],
)
def test_redirects_never_carry_the_registrys_credentials(location: str) -> None:
    seen: list[httpx.Request] = []
    ref = Reference.parse("registry.test/team/assets:v1")

    async def go() -> bytes:
        options = RegistryOptions(credentials=Credentials("u", SECRET))
        c = RegistryClient(ref, options, transport=_redirecting(location, seen))
        try:
            return await c.read_range(DIGEST, 0, 10, len(BLOB))
        finally:
            await c.aclose()

    assert trio.run(go) == BLOB[:10]
    sent_to_registry = [r for r in seen if (r.url.host, r.url.scheme, r.url.port) == ("registry.test", "https", None)]
    assert any("authorization" in r.headers for r in sent_to_registry)  # it was used where it belongs
    redirected = [r for r in seen if r not in sent_to_registry]
    assert redirected
    assert all("authorization" not in r.headers for r in redirected), [str(r.url) for r in redirected]
