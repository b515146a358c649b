"""The pull side's checks against the real registry: what a tag may name, how a tag is resolved
when HEAD is refused, and the digest winning over a tag."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

from blobmount.cli import main
from blobmount.manifest import ARTIFACT_TYPE, DATA_MEDIA_TYPE, EMPTY_MEDIA_TYPE, INDEX_MEDIA_TYPE
from blobmount.reference import Digest, Reference
from blobmount.registry.client import RegistryClient, RegistryOptions, bytes_reader
from blobmount.sources.remote import open_registry
from tests.support.helpers import FIXTURES
from tests.support.servers import QuirkProxy, Registry

CREATED = "2024-01-02T03:04:05Z"  # the fixtures' oci-manifest.json carry this
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def _desc(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}


async def _put(ref: Reference, blobs: list[bytes], manifest: dict[str, object]) -> None:
    client = RegistryClient(ref, RegistryOptions(), push=True)
    try:
        for blob in blobs:
            if not await client.blob_exists(Digest.of(blob)):
                await client.upload_blob(Digest.of(blob), len(blob), bytes_reader(blob))
        await client.put_manifest(ref.tag or "latest", json.dumps(manifest).encode(), str(manifest["mediaType"]))
    finally:
        await client.aclose()


def _archive_manifest_desc(name: str, media_type: str = OCI_MANIFEST) -> dict[str, object]:
    body = (FIXTURES / name / "oci-manifest.json").read_bytes()
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(body).hexdigest(), "size": len(body)}


CONFIG = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
LAYER = b"\x1f\x8b not really a tarball, the registry does not look"
INDEX_BLOB = (FIXTURES / "basic" / "index.blob").read_bytes()
DATA_BLOB = (FIXTURES / "basic" / "data.blob").read_bytes()

ODD_MANIFESTS: dict[str, tuple[list[bytes], dict[str, object], str]] = {
    "oci-index": (
        [],
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [_archive_manifest_desc("basic")]},
        "names an OCI image index (a list of images or artifacts), not a blob archive",
    ),
    "docker-list": (
        [],
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST,
            "manifests": [
                {
                    **_archive_manifest_desc("basic", DOCKER_MANIFEST),
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
            ],
        },
        "names a Docker manifest list (a list of images or artifacts), not a blob archive",
    ),
    "oci-image": (
        [CONFIG, LAYER],
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _desc("application/vnd.oci.image.config.v1+json", CONFIG),
            "layers": [_desc("application/vnd.oci.image.layer.v1.tar+gzip", LAYER)],
        },
        "names a container image (config application/vnd.oci.image.config.v1+json), not a blob archive",
    ),
    "docker-image": (
        [CONFIG, LAYER],
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": _desc("application/vnd.docker.container.image.v1+json", CONFIG),
            "layers": [_desc("application/vnd.docker.image.rootfs.diff.tar.gzip", LAYER)],
        },
        "names a Docker container image, not a blob archive",
    ),
    "other-artifact": (
        [b"{}", LAYER],
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sbom.v1",
            "config": _desc(EMPTY_MEDIA_TYPE, b"{}"),
            "layers": [_desc("application/vnd.example.sbom.v1+json", LAYER)],
        },
        "artifactType 'application/vnd.example.sbom.v1' is not 'application/vnd.meigma.blob.v1'",
    ),
    "three-layers": (
        [b"{}", INDEX_BLOB, DATA_BLOB, LAYER],
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": _desc(EMPTY_MEDIA_TYPE, b"{}"),
            "layers": [
                _desc(INDEX_MEDIA_TYPE, INDEX_BLOB),
                _desc(DATA_MEDIA_TYPE, DATA_BLOB),
                _desc(DATA_MEDIA_TYPE, LAYER),
            ],
        },
        "expected exactly 2 layers (index, data), found 3",
    ),
    "swapped-layers": (
        [b"{}", INDEX_BLOB, DATA_BLOB],
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": _desc(EMPTY_MEDIA_TYPE, b"{}"),
            "layers": [_desc(DATA_MEDIA_TYPE, DATA_BLOB), _desc(INDEX_MEDIA_TYPE, INDEX_BLOB)],
        },
        f"layer 0 has media type {DATA_MEDIA_TYPE!r}, not {INDEX_MEDIA_TYPE!r}",
    ),
}


@pytest.fixture(scope="module")
def odd(registry: Registry, pushed: dict[str, str]) -> dict[str, str]:
    """Each manifest of ODD_MANIFESTS pushed as odd/things:NAME (with the basic archive beside
    them, which the lists point at); name -> reference."""
    from blobmount.registry.push import push_archive

    refs = {}
    archive_ref = Reference.parse(f"{registry.host}/odd/things:archive")
    trio.run(functools.partial(push_archive, FIXTURES / "basic", archive_ref, RegistryOptions(), created=CREATED))
    for name, (blobs, manifest, _) in ODD_MANIFESTS.items():
        ref = Reference.parse(f"{registry.host}/odd/things:{name}")
        trio.run(_put, ref, blobs, manifest)
        refs[name] = str(ref)
    return refs


@pytest.mark.parametrize("name", ODD_MANIFESTS)
def test_a_tag_naming_something_else_is_one_clear_line(
    name: str, odd: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ls", odd[name]]) == 4
    err = capsys.readouterr().err
    assert ODD_MANIFESTS[name][2] in err
    assert err.count("\n") == 1
    assert err.startswith(f"blobmount: {odd[name]}: ")


@pytest.mark.parametrize("name", ["oci-index", "docker-image"])
def test_mounting_something_else_fails_before_mounting(name: str, odd: dict[str, str], tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "blobmount.cli", odd[name], str(mnt), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 4
    assert ODD_MANIFESTS[name][2] in result.stderr
    assert result.stderr.count("\n") == 1
    assert not any(line.split()[4] == str(mnt) for line in Path("/proc/self/mountinfo").read_text().splitlines())


@pytest.mark.parametrize("head", ["refuse", "no-digest"])
def test_a_refused_head_resolves_the_tag_with_one_get(head: str, quirk_proxy: QuirkProxy) -> None:
    """HEAD refused (405) or answered without Docker-Content-Digest: the tag is resolved with a GET
    whose body is hashed and kept, so the manifest is not fetched a second time by digest."""
    quirk_proxy.state.head = head
    archive = trio.run(open_registry, f"{quirk_proxy.host}/fixtures/mixed:v1", RegistryOptions())
    manifest = (FIXTURES / "mixed" / "oci-manifest.json").read_bytes()
    assert archive.name.endswith("@sha256:" + hashlib.sha256(manifest).hexdigest())
    assert archive.index_bytes == (FIXTURES / "mixed" / "index.blob").read_bytes()
    manifests = [(m, p) for m, p, _ in quirk_proxy.state.seen if "/manifests/" in p]
    assert manifests == [("HEAD", "/v2/fixtures/mixed/manifests/v1"), ("GET", "/v2/fixtures/mixed/manifests/v1")]


def test_a_head_with_the_digest_is_followed_by_one_get_by_digest(quirk_proxy: QuirkProxy) -> None:
    trio.run(open_registry, f"{quirk_proxy.host}/fixtures/mixed:v1", RegistryOptions())
    manifest = (FIXTURES / "mixed" / "oci-manifest.json").read_bytes()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    manifests = [(m, p) for m, p, _ in quirk_proxy.state.seen if "/manifests/" in p]
    assert manifests == [("HEAD", "/v2/fixtures/mixed/manifests/v1"), ("GET", f"/v2/fixtures/mixed/manifests/{digest}")]


def test_the_digest_wins_over_a_tag(
    quirk_proxy: QuirkProxy, pushed: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    digest = pushed["basic@"].rpartition("@")[2]
    assert main(["ls", f"{quirk_proxy.host}/fixtures/basic:no-such-tag@{digest}"]) == 0
    assert "top.md" in capsys.readouterr().out
    manifests = [(m, p) for m, p, _ in quirk_proxy.state.seen if "/manifests/" in p]
    assert manifests == [("GET", f"/v2/fixtures/basic/manifests/{digest}")]  # the tag is never asked
    unknown = "sha256:" + "0" * 64
    assert main(["ls", f"{quirk_proxy.host}/fixtures/basic:v1@{unknown}"]) == 3
    assert f"manifest {unknown} not found" in capsys.readouterr().err


def test_the_index_and_the_range_probe_are_fetched_together(quirk_proxy: QuirkProxy) -> None:
    """Opening sends the index GET and the data blob's one-byte probe at the same time (one round
    trip less before a mount is ready): the proxy holds each blob GET until the other arrives."""
    quirk_proxy.state.blob_gets_meet = threading.Barrier(2, timeout=10)
    archive = trio.run(open_registry, f"{quirk_proxy.host}/fixtures/mixed:v1", RegistryOptions())
    assert archive.index_bytes == (FIXTURES / "mixed" / "index.blob").read_bytes()
    assert quirk_proxy.state.blob_gets_met
    ranges = [h.get("range") for m, p, h in quirk_proxy.state.seen if m == "GET" and "/blobs/" in p]
    assert sorted(ranges, key=str) == [None, "bytes=0-0"]  # the whole index, one byte of data


@pytest.mark.parametrize("bearer", [False, True])
def test_answers_without_a_needed_body_leave_the_connection_reusable(bearer: bool, quirk_proxy: QuirkProxy) -> None:
    """The tag's HEAD (and with bearer auth its 401) are read to their end, so the next request
    reuses the connection instead of paying a new handshake (a round trip each)."""
    quirk_proxy.state.bearer = bearer
    trio.run(open_registry, f"{quirk_proxy.host}/fixtures/mixed:v1", RegistryOptions())
    manifests = [i for i, (m, p, _) in enumerate(quirk_proxy.state.seen) if "/manifests/" in p]
    assert len(manifests) == (3 if bearer else 2)  # (HEAD 401), HEAD, GET by digest
    assert len({quirk_proxy.state.ports[i] for i in manifests}) == 1
