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
