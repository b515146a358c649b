"""TLS to a registry: verified unless --insecure names that very host, or --ca-file vouches for its
certificate. The registry is the real one behind tests/support/faults.py's proxy serving HTTPS with a
throw-away self-signed certificate for registry.faults.test, which tests/support/resolver.py resolves to
127.0.0.1 (no real lookup)."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobmount.cli import main
from tests.support import resolver
from tests.support.faults import FaultProxy
from tests.support.servers import Registry

NAME = f"registry{resolver.FAKE_SUFFIX}"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={NAME}",
            "-addext", f"subjectAltName=DNS:{NAME}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_registry(
    registry: Registry, pushed: dict[str, str], certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """HOST:PORT of an HTTPS registry (under a name only the injected resolver knows)."""
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    proxy = FaultProxy(registry.host, tls=context)
    monkeypatch.setattr(socket, "getaddrinfo", resolver.resolver(Path("/nonexistent-dns-is-up"), socket.getaddrinfo))
    try:
        yield f"{NAME}:{proxy.port}"
    finally:
        proxy.stop()


def _inspect(host: str, *flags: str) -> int:
    return main(["inspect", f"{host}/fixtures/basic:v1", "--timeout", "5", *flags])


def test_an_unknown_certificate_is_refused_at_once_with_a_hint(
    tls_registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _inspect(tls_registry) == 1
    err = capsys.readouterr().err
    assert "certificate" in err
    assert "--insecure" in err  # says how to get on
    assert err.count("\n") == 1, err


def test_insecure_for_that_host_skips_verification(tls_registry: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _inspect(tls_registry, "--insecure", tls_registry) == 0
    assert "entries" in capsys.readouterr().out
    assert _inspect(tls_registry, "--insecure", NAME) == 0  # without a port: any port of the host


def test_insecure_for_another_host_does_not_apply(tls_registry: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _inspect(tls_registry, "--insecure", f"other{resolver.FAKE_SUFFIX}") == 1
    assert _inspect(tls_registry, "--insecure", f"{NAME}:1") == 1  # another port of the same host
    assert "certificate" in capsys.readouterr().err


def test_ca_file_vouches_for_the_certificate(
    tls_registry: str, certificate: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _inspect(tls_registry, "--ca-file", str(certificate[0])) == 0
    assert "entries" in capsys.readouterr().out


def test_https_to_a_plain_http_registry_says_plain_http(
    registry: Registry, pushed: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", resolver.resolver(Path("/nonexistent-dns-is-up"), socket.getaddrinfo))
    host = f"{NAME}:{registry.port}"  # not loopback by name: HTTPS by default
    assert _inspect(host) == 1
    assert "--plain-http" in capsys.readouterr().err
    assert _inspect(host, "--plain-http", host) == 0
