"""An archive's referrers (above registry/: it joins the OCI client and the profile format):
prefetch profiles pushed as OCI artifacts whose ``subject`` is the
archive's manifest, listed back for `inspect`, and the newest one fetched for ``--prefetch-profile
auto``.

The distribution spec (v1.1) lists a manifest's referrers at ``GET /v2/NAME/referrers/DIGEST``.
Registries without that API (docker-registry 2.8 answers 404) are served by its *referrers tag
schema*: the tag ``sha256-<hex of the subject digest>`` holds an OCI image index whose
``manifests`` are the referrers' descriptors (with their ``artifactType`` and annotations). A push
updates that index unless the registry answered the manifest PUT with ``OCI-Subject`` (it indexed
the subject itself). The update is read-modify-write: two pushes racing for one archive can lose
one of the two descriptors (the artifact itself stays; push it again to list it).

Referrers have no order. "Newest" is ours: the ``org.opencontainers.image.created`` annotation,
which a push copies from the profile's own ``created`` field; ties go to the larger digest so that
every host picks the same one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from blobmount.errors import InvalidArchive, UsageError
from blobmount.manifest import (
    CREATED_ANNOTATION,
    EMPTY_CONFIG,
    EMPTY_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    Descriptor,
    parse_manifest,
)
from blobmount.profile import MAX_PROFILE_BYTES
from blobmount.profile import MEDIA_TYPE as PROFILE_MEDIA_TYPE
from blobmount.reference import Digest, Reference
from blobmount.registry.client import RegistryClient, RegistryOptions, bytes_reader

log = logging.getLogger(__name__)

INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MAX_REFERRERS_BYTES = 4 << 20  # an index of referrers: ~200 bytes a descriptor
MAX_ARTIFACT_MANIFEST_BYTES = 64 << 10  # a profile's manifest is well under 1 KiB
ENTRIES_ANNOTATION = "dev.blobmount.profile.entries"
LOOKUP_ATTEMPTS = 2  # a profile is optional: its look-up gives up early, without retry warnings


@dataclass(frozen=True, slots=True)
class Referrer:
    """One descriptor of a referrers index."""

    digest: Digest
    size: int
    media_type: str
    artifact_type: str | None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def created(self) -> str:
        return self.annotations.get(CREATED_ANNOTATION, "")

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


def fallback_tag(subject: Digest) -> str:
    """The referrers tag schema's tag for `subject`: ``<alg>-<hex>`` (64 hex digits fit a tag)."""
    return f"{subject.algorithm}-{subject.hex}"


def parse_index(body: bytes, what: str) -> list[Referrer]:
    """The descriptors of a referrers index. Whatever a registry or another client wrote there is
    untrusted: a malformed index is an error, a malformed descriptor in it is skipped."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArchive(f"{what}: referrers index is not JSON ({str(exc)[:80]})") from None
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list):
        raise InvalidArchive(f"{what}: referrers index has no manifests list")
    out: list[Referrer] = []
    for item in manifests:
        if not isinstance(item, dict):
            continue
        media, digest, size = item.get("mediaType"), item.get("digest"), item.get("size")
        artifact, notes = item.get("artifactType"), item.get("annotations") or {}
        if not isinstance(media, str) or not isinstance(digest, str) or type(size) is not int or size < 0:
            continue
        if not isinstance(artifact, str | None) or not isinstance(notes, dict):
            continue
        try:
            parsed = Digest.parse(digest)
        except UsageError:
            continue
        clean = {str(k)[:256]: v[:1024] for k, v in notes.items() if isinstance(v, str)}
        out.append(Referrer(parsed, size, media, artifact, clean))
    return out


async def list_referrers(client: RegistryClient, subject: Digest) -> list[Referrer]:
    """`subject`'s referrers: the referrers API, else the tag schema's index; [] when neither has any."""
    body = await client.get_referrers(subject, MAX_REFERRERS_BYTES)
    where = f"{client.ref.registry}/{client.ref.repository}@{subject}"
    if body is None:
        body = await client.get_tag_manifest(fallback_tag(subject), MAX_REFERRERS_BYTES)
        if body is None:
            return []
    return parse_index(body, where)


def profile_manifest(layer: Descriptor, subject: Descriptor, annotations: dict[str, str]) -> bytes:
    """An OCI image manifest for one profile: the empty config, the profile as its one layer."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": PROFILE_MEDIA_TYPE,
        "config": Descriptor(EMPTY_MEDIA_TYPE, Digest.of(EMPTY_CONFIG), len(EMPTY_CONFIG)).as_json(),
        "layers": [layer.as_json()],
        "subject": subject.as_json(),
        "annotations": annotations,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


async def push_profile(
    ref: Reference, options: RegistryOptions, profile: bytes, created: str, entries: int, index_digest: str
) -> Digest:
    """Push `profile` (already checked by the caller) as a referrer of the archive `ref` names,
    which must have the index it was recorded on; return the artifact manifest's digest."""
    client = RegistryClient(ref, options, push=True)
    try:
        subject_digest = await client.resolve()
        subject_body = await client.get_manifest(subject_digest)
        (archive_index, _), _ = parse_manifest(subject_body, str(ref))  # a blob archive, nothing else
        if archive_index != index_digest:
            raise UsageError(
                f"{ref}: the profile was recorded on index {index_digest[:80]}, this archive's is {archive_index}"
            )
        subject = Descriptor(MANIFEST_MEDIA_TYPE, subject_digest, len(subject_body))
        config_digest = Digest.of(EMPTY_CONFIG)
        if not await client.blob_exists(config_digest):
            await client.upload_blob(config_digest, len(EMPTY_CONFIG), bytes_reader(EMPTY_CONFIG))
        layer = Descriptor(PROFILE_MEDIA_TYPE, Digest.of(profile), len(profile))
        if not await client.blob_exists(layer.digest):
            await client.upload_blob(layer.digest, len(profile), bytes_reader(profile))
        notes = {CREATED_ANNOTATION: created, ENTRIES_ANNOTATION: str(entries)}
        body = profile_manifest(layer, subject, notes)
        digest = await client.put_manifest(str(Digest.of(body)), body, MANIFEST_MEDIA_TYPE)
        if client.last_oci_subject != str(subject_digest):
            await _add_to_fallback_index(
                client, subject_digest, Referrer(digest, len(body), MANIFEST_MEDIA_TYPE, PROFILE_MEDIA_TYPE, notes)
            )
        return digest
    finally:
        await client.aclose()


async def _add_to_fallback_index(client: RegistryClient, subject: Digest, new: Referrer) -> None:
    """The tag schema: add `new` to the index at ``sha256-<hex>`` (created if absent). Descriptors
    already there are kept as they are, whoever wrote them."""
    tag = fallback_tag(subject)
    body = await client.get_tag_manifest(tag, MAX_REFERRERS_BYTES)
    kept: list[Any] = []
    if body is not None:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("manifests"), list):
            kept = [m for m in doc["manifests"] if not (isinstance(m, dict) and m.get("digest") == str(new.digest))]
        else:
            log.warning("%s: the referrers index at tag %s is malformed; replacing it", client.ref, tag)
    index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [*kept, new.as_json()]}
    await client.put_manifest(tag, json.dumps(index, separators=(",", ":")).encode(), INDEX_MEDIA_TYPE)


async def newest_profile(archive_name: str, options: RegistryOptions) -> tuple[Referrer, bytes] | None:
    """The newest prefetch profile pushed for the archive `archive_name` (registry/repo@digest),
    with its bytes (size-capped and digest-checked, not yet parsed); None when it has none."""
    ref = Reference.parse(archive_name)
    if ref.digest is None:
        raise UsageError(f"{archive_name}: not pinned to a digest")
    client = RegistryClient(ref, options, max_attempts=LOOKUP_ATTEMPTS)
    try:
        found = [r for r in await list_referrers(client, ref.digest) if r.artifact_type == PROFILE_MEDIA_TYPE]
        if not found:
            return None
        newest = max(found, key=lambda r: (r.created, r.digest.hex))
        if newest.size > MAX_ARTIFACT_MANIFEST_BYTES:
            raise InvalidArchive(f"profile {newest.digest}: a {newest.size}-byte manifest; refused")
        manifest = await client.get_manifest(newest.digest)
        layer = _profile_layer(manifest, ref.digest, str(newest.digest))
        blob = await client.get_blob(layer.digest, layer.size, MAX_PROFILE_BYTES)
        return newest, blob
    finally:
        await client.aclose()


def _profile_layer(body: bytes, subject: Digest, what: str) -> Descriptor:
    """The profile layer of an artifact manifest, checked to be ours and to refer to `subject`."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidArchive(f"profile {what}: manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("artifactType") != PROFILE_MEDIA_TYPE:
        raise InvalidArchive(f"profile {what}: not a {PROFILE_MEDIA_TYPE} manifest")
    sub = doc.get("subject")
    if not isinstance(sub, dict) or sub.get("digest") != str(subject):
        raise InvalidArchive(f"profile {what}: its subject is not this archive")
    layers = doc.get("layers")
    first = layers[0] if isinstance(layers, list) and len(layers) == 1 else None
    if not isinstance(first, dict) or first.get("mediaType") != PROFILE_MEDIA_TYPE:
        raise InvalidArchive(f"profile {what}: expected one {PROFILE_MEDIA_TYPE} layer")
    digest, size = first.get("digest"), first.get("size")
    if not isinstance(digest, str) or type(size) is not int or not 0 <= size <= MAX_PROFILE_BYTES:
        raise InvalidArchive(f"profile {what}: its layer is malformed or larger than {MAX_PROFILE_BYTES} bytes")
    try:
        return Descriptor(PROFILE_MEDIA_TYPE, Digest.parse(digest), size)
    except UsageError as exc:
        raise InvalidArchive(f"profile {what}: {exc}") from None
