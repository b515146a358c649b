"""Hostile registry answers at open time, through tests/support/faults.py's proxy in front of the real
registry: manifests that are not blob archives, lie about sizes or digests, never end; index blobs
that do not match their descriptor. Each is refused with one line and its documented exit code
(4 invalid archive, 3 not found, 1 other), within the time budget, and no hostile answer is ever
turned into a usage error (2) or into data."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from typing import Any

import pytest

from blobmount.cli import main
from blobmount.manifest import DATA_MEDIA_TYPE, INDEX_MEDIA_TYPE
from tests.support.faults import Fault, FaultProxy, Kind, blob, path_prefix
from tests.support.helpers import FIXTURES

TIMEOUT_S = 1.0  # --timeout: opening is bounded by 4x it, and four tests here wait that long
REPO = "fixtures/basic"
REAL = json.loads((FIXTURES / "basic" / "oci-manifest.json").read_bytes())
INDEX_DIGEST = REAL["layers"][0]["digest"]
MANIFEST_PATHS = path_prefix(f"/v2/{REPO}/manifests/")


def _doc(change: Any) -> bytes:
    doc = copy.deepcopy(REAL)
    change(doc)
    return json.dumps(doc).encode()


def _set(path: list[Any], value: Any) -> Any:
    def change(doc: Any) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


IMAGE_INDEX = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": INDEX_DIGEST, "size": 9}],
    }
).encode()
CONTAINER_IMAGE = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": INDEX_DIGEST, "size": 1864},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": INDEX_DIGEST, "size": 1864}],
    }
).encode()

# name -> (manifest body, exit code, phrase of the one-line error)
MANIFESTS: dict[str, tuple[bytes, int, str]] = {
    "image index": (IMAGE_INDEX, 4, "image index (a list of images or artifacts), not a blob archive"),
    "container image": (CONTAINER_IMAGE, 4, "names a container image"),
    "docker schema 2": (
        _doc(_set(["mediaType"], "application/vnd.docker.distribution.manifest.v2+json")),
        4,
        "names a Docker container image",
    ),
    "wrong artifactType": (_doc(_set(["artifactType"], "application/x-other")), 4, "artifactType"),
    "extra layer": (_doc(lambda d: d["layers"].append(d["layers"][1])), 4, "exactly 2 layers (index, data), found 3"),
    "one layer": (_doc(lambda d: d["layers"].pop()), 4, "found 1"),
    "no layers": (_doc(_set(["layers"], None)), 4, "found no"),
    "layers swapped": (_doc(lambda d: d["layers"].reverse()), 4, "layer 0 has media type"),
    "index media type": (_doc(_set(["layers", 0, "mediaType"], "application/octet-stream")), 4, "layer 0"),
    "data media type": (_doc(_set(["layers", 1, "mediaType"], INDEX_MEDIA_TYPE)), 4, "layer 1"),
    "huge index size": (_doc(_set(["layers", 0, "size"], 1 << 40)), 4, "exceeds"),
    "huge data size": (_doc(_set(["layers", 1, "size"], 1 << 62)), 1, "blob has 8375 bytes, its descriptor says"),
    "negative size": (_doc(_set(["layers", 0, "size"], -1)), 4, "valid size"),
    "size as text": (_doc(_set(["layers", 1, "size"], "8375")), 4, "valid size"),
    "size as boolean": (_doc(_set(["layers", 0, "size"], False)), 4, "valid size"),
    "index size too small": (_doc(_set(["layers", 0, "size"], 100)), 4, "is 1864 bytes, the manifest says 100"),
    "index size too large": (_doc(_set(["layers", 0, "size"], 5000)), 4, "is 1864 bytes, the manifest says 5000"),
    "not JSON": (b"<html>502 Bad Gateway</html>", 4, "not JSON"),
    "JSON array": (b"[]", 4, "not a JSON object"),
    "5 MiB manifest": (b"{" + b" " * (5 << 20) + b"}", 4, "larger than"),
}


def _serve_manifest(proxy: FaultProxy, body: bytes) -> Fault:
    """Answer every manifest request (by tag and by digest) with `body`, digest header included."""
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json", "Docker-Content-Digest": digest}
    return proxy.add(Fault(Kind.STATUS, MANIFEST_PATHS, status=200, headers=headers, body=body))


def _inspect(proxy: FaultProxy, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    t0 = time.monotonic()
    code = main(["inspect", f"{proxy.host}/{REPO}:v1", "--timeout", str(TIMEOUT_S)])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    return code, err, elapsed


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("blobmount: ") and "WARNING" not in ln]
    assert len(lines) == 1, err
    return lines[0]


# A body cut short by our limit leaves httpx's internal async generators to the garbage collector,
# which trio reports as a ResourceWarning (encode/httpx#3686); the response itself is closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", list(MANIFESTS))
def test_hostile_manifest_is_refused_with_one_line(
    case: str, fault_proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    body, code, phrase = MANIFESTS[case]
    fault = _serve_manifest(fault_proxy, body)
    got, err, _ = _inspect(fault_proxy, capsys)
    assert fault.hits >= 1
    line = _one_line(err)
    assert phrase in line, line
    assert got == code, line


def test_malformed_layer_digest_is_an_invalid_archive(
    fault_proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    _serve_manifest(fault_proxy, _doc(_set(["layers", 0, "digest"], "sha256:not-hex")))
    code, err, _ = _inspect(fault_proxy, capsys)
    assert "malformed" in _one_line(err)
    assert code == 4


def test_manifest_body_not_matching_its_digest(fault_proxy: FaultProxy, capsys: pytest.CaptureFixture[str]) -> None:
    """HEAD names the real digest; GET by that digest answers another (valid) archive's manifest."""
    other = (FIXTURES / "mixed" / "oci-manifest.json").read_bytes()
    real_digest = "sha256:" + hashlib.sha256((FIXTURES / "basic" / "oci-manifest.json").read_bytes()).hexdigest()
    fault = fault_proxy.add(Fault(Kind.REPLACE, path_prefix(f"/v2/{REPO}/manifests/{real_digest}"), body=other))
    code, err, _ = _inspect(fault_proxy, capsys)
    assert fault.hits >= 1
    assert "manifest body hashes to" in _one_line(err)
    assert code == 4


def test_digest_header_pointing_nowhere_is_not_found(
    fault_proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = "sha256:" + "0" * 64
    fault_proxy.add(
        Fault(
            Kind.STATUS, path_prefix(f"/v2/{REPO}/manifests/v1"), status=200, headers={"Docker-Content-Digest": nowhere}
        )
    )
    code, err, _ = _inspect(fault_proxy, capsys)
    assert "not found" in _one_line(err)
    assert code == 3


def test_index_blob_not_matching_its_digest(fault_proxy: FaultProxy, capsys: pytest.CaptureFixture[str]) -> None:
    index = (FIXTURES / "basic" / "index.blob").read_bytes()
    forged = index[:-1] + bytes([index[-1] ^ 1])
    fault = fault_proxy.add(Fault(Kind.REPLACE, blob(INDEX_DIGEST), body=forged))
    code, err, _ = _inspect(fault_proxy, capsys)
    assert fault.hits >= 1
    assert "blob body hashes to" in _one_line(err)
    assert code == 4


@pytest.mark.parametrize(
    "fault",
    [
        Fault(Kind.DRIP, MANIFEST_PATHS, rate_bps=64),
        Fault(Kind.STALL, MANIFEST_PATHS),
        Fault(Kind.STATUS, MANIFEST_PATHS, status=503),
        Fault(Kind.DRIP, blob(INDEX_DIGEST), rate_bps=64),
    ],
    ids=["manifest-drip", "manifest-stall", "manifest-503", "index-drip"],
)
def test_a_registry_that_never_answers_fails_the_open_in_bounded_time(
    fault: Fault, fault_proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    """Opening is bounded by 4 x --timeout (DESIGN section 8): one line, exit 1, never 3."""
    fault_proxy.add(fault)
    code, err, elapsed = _inspect(fault_proxy, capsys)
    assert fault.hits >= 1
    _one_line(err)
    assert code == 1, err
    assert elapsed < 10 * 4 * TIMEOUT_S  # hang guard only; the figure is in the README table


def test_data_media_type_constant_is_what_we_check() -> None:
    assert REAL["layers"][1]["mediaType"] == DATA_MEDIA_TYPE
