"""Checking a manifest we are handed: each way it can fail to be a blob archive has its own line.
(The kinds a registry will store are also pushed and pulled for real in tests/registry.)"""

from __future__ import annotations

import copy
import json

import pytest

from blobmount.errors import InvalidArchive
from blobmount.manifest import MAX_INDEX_BYTES, created_ns, parse_manifest
from tests.support.helpers import FIXTURES

GOOD = json.loads((FIXTURES / "mixed" / "oci-manifest.json").read_bytes())


def test_the_reference_manifest_passes() -> None:
    (index_digest, index_size), (data_digest, data_size) = parse_manifest(json.dumps(GOOD).encode(), "x")
    assert (index_digest, index_size) == (GOOD["layers"][0]["digest"], GOOD["layers"][0]["size"])
    assert (data_digest, data_size) == (GOOD["layers"][1]["digest"], GOOD["layers"][1]["size"])


def _with(path: str, value: object) -> dict[str, object]:
    doc = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: int | str = int(last) if isinstance(node, list) else last
    if value is KeyError:
        del node[key]
    else:
        node[key] = value
    return doc  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_with("schemaVersion", 1), "not an OCI image manifest"),
        (_with("mediaType", KeyError), "not an OCI image manifest (mediaType 'None')"),
        (_with("mediaType", "application/vnd.oci.image.index.v1+json"), "names an OCI image index"),
        (_with("manifests", []), "names an image index"),
        (_with("config.mediaType", "application/vnd.oci.image.config.v1+json"), "names a container image"),
        (_with("artifactType", KeyError), "artifactType 'None' is not"),
        (_with("artifactType", "application/vnd.meigma.blob.v2"), "artifactType 'application/vnd.meigma.blob.v2'"),
        (_with("layers", []), "expected exactly 2 layers (index, data), found 0"),
        (_with("layers", "two"), "expected exactly 2 layers (index, data), found no"),
        (_with("layers.1.mediaType", "application/octet-stream"), "layer 1 has media type 'application/octet-stream'"),
        (_with("layers.0.size", -1), "layer 0: descriptor lacks mediaType, digest or a valid size"),
        (_with("layers.0.digest", KeyError), "layer 0: descriptor lacks mediaType, digest or a valid size"),
        (_with("layers.1", "sha256:abc"), "layer 1: descriptor is not an object"),
        (_with("layers.0.size", MAX_INDEX_BYTES + 1), f"index blob of {MAX_INDEX_BYTES + 1} bytes exceeds"),
    ],
)
def test_what_is_wrong_is_named(doc: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArchive) as info:
        parse_manifest(json.dumps(doc).encode(), "reg.example/a:v1")
    assert message in str(info.value)
    assert str(info.value).startswith("reg.example/a:v1: ")


@pytest.mark.parametrize(("body", "message"), [(b"\xff{", "manifest is not JSON"), (b"[1, 2]", "not a JSON object")])
def test_not_a_json_object(body: bytes, message: str) -> None:
    with pytest.raises(InvalidArchive, match=message):
        parse_manifest(body, "x")


def _created(value: object) -> bytes:
    doc = copy.deepcopy(GOOD)
    doc["annotations"] = {"org.opencontainers.image.created": value}
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("value", "ns"),
    [
        ("2024-01-02T03:04:05Z", 1_704_164_645_000_000_000),
        ("2024-01-02T03:04:05.25Z", 1_704_164_645_250_000_000),
        ("2024-01-02T04:04:05+01:00", 1_704_164_645_000_000_000),
        ("2024-01-02T03:04:05", 1_704_164_645_000_000_000),  # no offset: UTC
        ("yesterday", None),
        (1704164645, None),
        ("9999-12-31T23:59:59Z", None),  # past a signed 64-bit st_mtime_ns
    ],
)
def test_created_annotation_dates_the_archive(value: object, ns: int | None) -> None:
    assert created_ns(_created(value)) == ns


def test_created_is_none_without_the_annotation() -> None:
    assert created_ns((FIXTURES / "mixed" / "oci-manifest.json").read_bytes()) == 1_704_164_645_000_000_000
    doc = copy.deepcopy(GOOD)
    del doc["annotations"]
    assert created_ns(json.dumps(doc).encode()) is None
    assert created_ns(b"not json") is None
