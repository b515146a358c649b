"""containerd's hosts.toml layout as blobmount reads it: order, capabilities, TLS settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobmount.errors import UsageError
from blobmount.reference import Reference
from blobmount.registry.client import Endpoint, RegistryOptions
from blobmount.registry.mirrors import endpoints_for, load_hosts_toml


def write(tmp_path: Path, registry: str, text: str) -> Path:
    conf = tmp_path / registry
    conf.mkdir(parents=True)
    (conf / "hosts.toml").write_text(text)
    return tmp_path


def test_hosts_in_file_order_with_their_settings(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        "registry.example",
        'server = "https://registry.example"\n'
        '[host."https://mirror-b.example:5000"]\n  capabilities = ["pull", "resolve"]\n  ca = "b-ca.pem"\n'
        '[host."http://mirror-a.example"]\n  capabilities = ["pull"]\n'
        '[host."https://pusher.example"]\n  capabilities = ["push"]\n'
        '[host."https://self-signed.example"]\n  skip_verify = true\n  ca = "/etc/ssl/x.pem"\n',
    )
    assert load_hosts_toml(root, "registry.example") == [
        Endpoint("mirror-b.example:5000", False, False, root / "registry.example" / "b-ca.pem", True),
        Endpoint("mirror-a.example", True, False, None, False),
        Endpoint("self-signed.example", False, True, Path("/etc/ssl/x.pem"), True),
    ]
    assert load_hosts_toml(root, "other.example") == []


def test_flag_mirrors_come_first(tmp_path: Path) -> None:
    root = write(tmp_path, "registry.example", '[host."https://toml.example"]\n')
    options = RegistryOptions(mirrors=("flag.example",), hosts_dir=root)
    hosts = [e.host for e in endpoints_for(Reference.parse("registry.example/a/b:v1"), options)]
    assert hosts == ["flag.example", "toml.example"]


@pytest.mark.parametrize("text", ["[host", 'host = "x"\n', '[host."ftp://mirror.example"]\n', '[host."https://"]\n'])
def test_a_broken_hosts_toml_is_a_usage_error_naming_the_file(tmp_path: Path, text: str) -> None:
    root = write(tmp_path, "registry.example", text)
    with pytest.raises(UsageError, match=r"hosts\.toml"):
        load_hosts_toml(root, "registry.example")
