"""Fuzz targets for the text parsers: any input ends in a value or the one documented error."""

from __future__ import annotations

import contextlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from blobmount.errors import InvalidArchive, SourceError, UsageError
from blobmount.manifest import parse_manifest
from blobmount.reference import Reference
from blobmount.registry.auth import parse_www_authenticate
from blobmount.registry.client import check_content_range

EXAMPLES = int(os.environ.get("BLOBMOUNT_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True)


@FUZZ
@given(st.text(max_size=300))
def test_www_authenticate_never_raises(header: str) -> None:
    for challenge in parse_www_authenticate(header):
        assert challenge.scheme


@FUZZ
@given(st.text(max_size=80), st.integers(0, 2**64), st.integers(1, 2**20), st.integers(0, 2**64))
def test_content_range_accepts_only_the_exact_range(value: str, start: int, length: int, size: int) -> None:
    try:
        check_content_range(value, start, start + length, size)
    except SourceError:
        return
    assert value.strip().lower().startswith("bytes ")


@FUZZ
@given(st.text(max_size=200))
def test_reference_parse_is_total(text: str) -> None:
    try:
        ref = Reference.parse(text)
    except UsageError as exc:
        message = str(exc)
        assert "\n" not in message
        return
    assert Reference.parse(str(ref)) == ref


@FUZZ
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
        max_leaves=20,
    )
)
def test_manifest_parse_is_total(doc: object) -> None:
    import json

    with contextlib.suppress(InvalidArchive):
        parse_manifest(json.dumps(doc).encode(), "fuzz")


# -- structured targets: inputs near the valid ones, where parsers go wrong ------------------------

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-", min_size=1, max_size=12)
_VALUE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Bearer", "Basic", "bearer", "Negotiate"]),
            st.dictionaries(_TOKEN.map(str.lower), _VALUE, max_size=5),
        ),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from([",", ", ", " , "]),
)
def test_www_authenticate_round_trips(challenges: list[tuple[str, dict[str, str]]], sep: str) -> None:
    """Challenges written the way registries write them (quoted values with commas, quotes and
    backslashes inside) come back exactly."""
    header = ", ".join(
        f"{scheme} " + sep.join(f"{k}={_quote(v)}" for k, v in params.items()) for scheme, params in challenges
    )
    parsed = parse_www_authenticate(header)
    assert [(c.scheme, c.params) for c in parsed] == [(s.lower(), p) for s, p in challenges]


_NEAR = st.one_of(st.integers(-2, 2), st.just(None))


@FUZZ
@given(
    st.integers(0, 2**40),
    st.integers(1, 2**20),
    st.integers(0, 2**20),
    _NEAR,
    _NEAR,
    st.one_of(_NEAR, st.just("*")),
    st.sampled_from(["bytes", "Bytes", "items", ""]),
    st.sampled_from(["", " ", "  "]),
)
def test_content_range_near_misses(
    start: int, length: int, extra: int, da: int | None, db: int | None, dt: int | str | None, unit: str, pad: str
) -> None:
    """`bytes a-b/t` one off in any field, or garbled, is never taken for the asked range; the
    exact answer always is."""
    end, size = start + length, start + length + extra
    a = "" if da is None else str(start + da)
    b = "" if db is None else str(end - 1 + db)
    t = "*" if dt == "*" else "" if dt is None else str(size + dt)  # type: ignore[operator]
    value = f"{pad}{unit} {a}-{b}/{t}{pad}"
    exact = unit.lower() == "bytes" and da == 0 and db == 0 and (dt == 0 or dt == "*")
    try:
        check_content_range(value, start, end, size)
    except SourceError:
        assert not exact, value
        return
    assert exact, value


_COMPONENTS = st.from_regex(r"[a-z0-9]{1,6}([._-][a-z0-9]{1,6}){0,2}", fullmatch=True)


@FUZZ
@given(
    st.one_of(
        st.none(),
        st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z0-9]{1,6}){1,2}", fullmatch=True),
        st.just("localhost"),
        st.from_regex(r"127\.0\.0\.[0-9]{1,2}", fullmatch=True),
    ),
    st.one_of(st.none(), st.integers(1, 65535)),
    st.lists(_COMPONENTS, min_size=1, max_size=3),
    st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
    st.one_of(st.none(), st.binary(min_size=1, max_size=8)),
)
def test_reference_fields_come_back(
    host: str | None, port: int | None, parts: list[str], tag: str | None, digest_of: bytes | None
) -> None:
    """A reference assembled from valid parts parses into exactly those parts."""
    from hypothesis import assume

    from blobmount.reference import Digest

    # without a registry, a first component that looks like a host is one (Docker's rule)
    assume(host is not None or not ("." in parts[0] or parts[0] == "localhost"))

    registry = None if host is None else host + (f":{port}" if port else "")
    digest = None if digest_of is None else Digest.of(digest_of)
    repo = "/".join(parts)
    text = (f"{registry}/" if registry else "") + repo + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    try:
        ref = Reference.parse(text)
    except UsageError as exc:
        refusal = str(exc)
        assert "longer than" in refusal, text  # only the 255-character name limit may refuse
        return
    assert ref.tag == tag
    assert ref.digest == digest
    if registry is None:
        assert ref.registry == "docker.io"
        assert ref.repository == (repo if "/" in repo else "library/" + repo)
    else:
        assert (ref.registry, ref.repository) == (registry, repo)


_REAL_MANIFEST: dict[str, object] = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "artifactType": "application/vnd.meigma.blob.v1",
    "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "sha256:" + "4" * 64, "size": 2},
    "layers": [
        {"mediaType": "application/vnd.meigma.blob.index.v1+flatbuffers", "digest": "sha256:" + "1" * 64, "size": 1864},
        {"mediaType": "application/vnd.meigma.blob.data.v1", "digest": "sha256:" + "2" * 64, "size": 8375},
    ],
}
_ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=False), st.text(max_size=8), st.just([])
)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    ("schemaVersion",),
                    ("mediaType",),
                    ("artifactType",),
                    ("layers",),
                    ("layers", 0),
                    ("layers", 1),
                    ("layers", 0, "mediaType"),
                    ("layers", 1, "mediaType"),
                    ("layers", 0, "size"),
                    ("layers", 1, "size"),
                    ("layers", 0, "digest"),
                    ("layers", 1, "digest"),
                    ("manifests",),
                ]
            ),
            _ODD,
            st.booleans(),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_manifest_mutations_are_refused_or_exact(mutations: list[tuple[tuple[object, ...], object, bool]]) -> None:
    """One to four fields of a valid manifest replaced by odd values or deleted: either the one
    clear error, or the answer is exactly the (still valid) layers: never a negative, boolean or
    oversized size, never a wrong media type let through."""
    import copy
    import json

    doc: object = copy.deepcopy(_REAL_MANIFEST)
    for path, value, delete in mutations:
        target = doc
        for key in path[:-1]:
            try:
                target = target[key]  # type: ignore[index]
            except (KeyError, IndexError, TypeError):
                break
        else:
            try:
                if delete:
                    del target[path[-1]]  # type: ignore[attr-defined]
                else:
                    target[path[-1]] = value  # type: ignore[index]
            except (KeyError, IndexError, TypeError):
                pass
    try:
        (index_digest, index_size), (data_digest, data_size) = parse_manifest(json.dumps(doc).encode(), "fuzz")
    except InvalidArchive as exc:
        refusal = str(exc)
        assert "\n" not in refusal
        return
    layers = doc["layers"]  # type: ignore[index]
    assert layers[0]["mediaType"] == "application/vnd.meigma.blob.index.v1+flatbuffers"
    assert layers[1]["mediaType"] == "application/vnd.meigma.blob.data.v1"
    for size in (index_size, data_size):
        assert type(size) is int
        assert size >= 0
    assert (index_digest, data_digest) == (layers[0]["digest"], layers[1]["digest"])
