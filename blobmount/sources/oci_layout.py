"""An OCI image layout (the skopeo/oras directory format) as a SOURCE: `oci:PATH[:TAG]` read, and an
archive written into one (``blobmount push oci:PATH:TAG``). Reader and writer sit side by side so
that the two agree on the layout: blobs by sha256 under ``blobs/``, the tag as the
``org.opencontainers.image.ref.name`` annotation in ``index.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from blobmount.errors import InvalidArchive, SourceError, UsageError
from blobmount.manifest import MAX_MANIFEST_BYTES, created_ns, descriptor, parse_manifest
from blobmount.sources.base import Archive
from blobmount.sources.local import LocalFileSource, mtime_ns, read_file


def _oci_blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise InvalidArchive(f"{layout}: unsupported or malformed digest {digest[:80]!r}")
    return layout / "blobs" / "sha256" / hexpart


def layout_and_tag(spec: str) -> tuple[Path, str | None]:
    """`PATH[:TAG]` -> the layout directory and the tag (None: the layout's only manifest). A
    directory whose name holds a colon is a PATH, not PATH:TAG."""
    if not Path(spec).is_dir() and ":" in spec:
        path_text, _, tag = spec.rpartition(":")
        return Path(path_text), tag
    return Path(spec), None


def open_oci_layout(spec: str) -> Archive:
    """`PATH[:TAG]` of an OCI image layout directory (the skopeo/oras naming)."""
    layout, tag = layout_and_tag(spec)
    index_doc_bytes = read_file(layout / "index.json", MAX_MANIFEST_BYTES, "OCI layout index.json")
    try:
        index_doc = json.loads(index_doc_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArchive(f"{layout}/index.json: not JSON ({exc})") from exc
    manifests = index_doc.get("manifests") if isinstance(index_doc, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise InvalidArchive(f"{layout}/index.json: no manifests")
    chosen = None
    if tag is None:
        if len(manifests) != 1:
            raise UsageError(f"oci:{layout}: holds {len(manifests)} manifests; name one as oci:PATH:TAG")
        chosen = manifests[0]
    else:
        for m in manifests:
            ann = m.get("annotations") if isinstance(m, dict) else None
            if isinstance(ann, dict) and ann.get("org.opencontainers.image.ref.name") == tag:
                chosen = m
                break
        if chosen is None:
            raise SourceError(f"oci:{layout}: no manifest tagged {tag!r}")
    _media, mdigest, msize = descriptor(chosen, f"oci:{layout}: manifest descriptor")
    if msize > MAX_MANIFEST_BYTES:
        raise InvalidArchive(f"oci:{layout}: manifest of {msize} bytes exceeds {MAX_MANIFEST_BYTES}")
    body = _read_verified(layout, mdigest, msize, "manifest")
    (idigest, isize), (ddigest, dsize) = parse_manifest(body, f"oci:{layout}")
    index = _read_verified(layout, idigest, isize, "index blob")
    data = LocalFileSource(_oci_blob_path(layout, ddigest))
    if data.size != dsize:
        data.close()
        raise InvalidArchive(f"oci:{layout}: data blob has {data.size} bytes, manifest says {dsize}")
    created = created_ns(body)
    if created is None:  # a layout written without the annotation: when its index.json was
        created = mtime_ns(layout / "index.json")
    return Archive(f"oci:{spec}", index, data, idigest, created)


def write_oci_layout(archive_dir: Path, spec: str, manifest: bytes) -> str:
    """Store an archive as `oci:PATH:TAG` (blobs by digest, the tag in index.json, replacing an
    older manifest of that tag); return the manifest digest. index.json is replaced atomically."""
    path_text, sep, tag = spec.rpartition(":")
    if not sep or not tag or "/" in tag:
        raise UsageError(f"oci:{spec}: name the tag as oci:PATH:TAG")
    layout = Path(path_text)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes | None, src: Path | None) -> str:
        if src is not None:
            hasher = hashlib.sha256()
            with open(src, "rb") as f:
                while block := f.read(1 << 20):
                    hasher.update(block)
            digest = hasher.hexdigest()
            if not (blobs / digest).exists():
                tmp = blobs / f".{digest}.tmp"
                try:
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, blobs / digest)
                except OSError:  # a full disk: no partial blob left behind
                    tmp.unlink(missing_ok=True)
                    raise
        else:
            assert data is not None
            digest = hashlib.sha256(data).hexdigest()
            (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    put(b"{}", None)
    put(None, archive_dir / "index.blob")
    put(None, archive_dir / "data.blob")
    mdigest = put(manifest, None)
    try:
        doc = json.loads((layout / "index.json").read_text())
    except FileNotFoundError:
        doc = {"schemaVersion": 2, "manifests": []}
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArchive(f"{layout}/index.json: unreadable ({exc})") from exc
    keep = [
        m
        for m in doc.get("manifests", [])
        if not (isinstance(m, dict) and m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    ]
    keep.append(
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest,
            "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }
    )
    doc["manifests"] = keep
    tmp = layout / ".index.json.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, layout / "index.json")
    return mdigest


def _read_verified(layout: Path, digest: str, size: int, what: str) -> bytes:
    body = read_file(_oci_blob_path(layout, digest), max(size, 0), what)
    actual = "sha256:" + hashlib.sha256(body).hexdigest()
    if len(body) != size or actual != digest:
        raise InvalidArchive(
            f"oci:{layout}: {what} does not match its descriptor (expected {digest}, {size} bytes;"
            f" got {actual}, {len(body)} bytes)"
        )
    return body
