"""References: Docker Hub rules, loopback over plain HTTP, the digest winning over a tag, and one
clear line for each way a reference can be malformed."""

from __future__ import annotations

import pytest

from blobmount.errors import UsageError
from blobmount.reference import Digest, Reference

HEX = "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "api_host", "repository", "tag"),
    [
        ("ubuntu", "docker.io", "registry-1.docker.io", "library/ubuntu", None),
        ("docker.io/ubuntu:22.04", "docker.io", "registry-1.docker.io", "library/ubuntu", "22.04"),
        ("index.docker.io/team/app", "docker.io", "registry-1.docker.io", "team/app", None),
        ("team/app:v3", "docker.io", "registry-1.docker.io", "team/app", "v3"),
        ("localhost/a", "localhost", "localhost", "a", None),
        ("localhost:5000/a/b/c:t", "localhost:5000", "localhost:5000", "a/b/c", "t"),
        ("registry.example/team/assets:v3", "registry.example", "registry.example", "team/assets", "v3"),
        ("[::1]:5000/a/b", "[::1]:5000", "[::1]:5000", "a/b", None),
    ],
)
def test_registry_rules(text: str, registry: str, api_host: str, repository: str, tag: str | None) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.api_host, ref.repository, ref.tag) == (registry, api_host, repository, tag)
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("registry", "plain"),
    [
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.9.8.7", True),
        ("[::1]:5000", True),
        ("registry.example", False),
        ("10.0.0.1:5000", False),
        ("localhost.example", False),
    ],
)
def test_only_loopback_speaks_plain_http_by_default(registry: str, plain: bool) -> None:
    assert Reference.parse(f"{registry}/a/b").plain_http_default is plain


def test_the_digest_wins_over_the_tag() -> None:
    ref = Reference.parse(f"registry.example/team/app:v3@sha256:{HEX}")
    assert ref.tag == "v3"
    assert ref.digest == Digest("sha256", HEX)
    assert ref.ref_for_manifest == f"sha256:{HEX}"
    assert Reference.parse("registry.example/team/app").ref_for_manifest == "latest"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty reference"),
        (" team/app", "contains whitespace"),
        ("team/app :v1", "contains whitespace"),
        ("https://registry.example/team/app", "give registry/repo[:tag], not a URL"),
        ("Team/app", "repository component 'Team' must be lowercase letters and digits"),
        ("team/app:", "malformed tag ''"),
        ("team/app:-v1", "malformed tag '-v1'"),
        ("team/app:" + "x" * 129, "malformed tag"),
        ("team/app:v1:v2", "':' in the repository name"),
        ("team//app", "empty repository component"),
        ("team/app/", "empty repository component"),
        ("localhost:5000/", "no repository"),
        (":v1", "no repository"),
        ("team/app@", "'team/app@': malformed digest ''"),
        ("team/app@sha256:abc", "'team/app@sha256:abc': malformed sha256 digest"),
        (f"team/app@sha256:{HEX.upper()}", "64 lowercase hex digits"),
        ("team/app@md5:abc", "unsupported digest algorithm 'md5'"),
        ("registry.example:99999/a", "port 99999 out of range"),
        ("registry.example:0/a", "port 0 out of range"),
        ("reg_x.example/a", "malformed registry host 'reg_x.example'"),
        ("[::1/a", "malformed registry host '[::1'"),
        ("registry.example/" + "a" * 250, "name longer than 255 characters"),
    ],
)
def test_malformed_references_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        Reference.parse(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
