"""The commands on archives: create, ls, cat, cp, push, inspect. Each parses nothing itself (parser.py)
and calls the library; heavy modules are imported inside the command, so `--help` stays fast."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blobmount.errors import EXIT_OK, BlobmountError, IsADirectory, UsageError

if TYPE_CHECKING:
    from blobmount.index import IndexView
    from blobmount.reference import Reference
    from blobmount.registry.options import RegistryOptions
    from blobmount.sources.base import Archive

from blobmount.cli.options import cache_config, cache_dir_of, create_options, registry_options
from blobmount.cli.parser import create_args
from blobmount.cli.runner import run_interruptible

log = logging.getLogger("blobmount")


def _arch_path(text: str) -> bytes:
    return os.fsencode(text.strip("/"))


def cmd_create(args: argparse.Namespace) -> int:
    from blobmount.create import create_archive

    started = time.monotonic()
    result = create_archive(args.src_dir, args.out_dir, create_options(args))
    took = time.monotonic() - started
    print(
        f"{result.entries} files, data {result.data_size} bytes sha256:{result.data_sha256}, "
        f"index {result.index_size} bytes sha256:{result.index_sha256}"
        + (f", {result.skipped} skipped" if result.skipped else "")
        + f" ({took:.2f} s)"
    )
    return EXIT_OK


def _open_view(args: argparse.Namespace) -> tuple[Archive, IndexView]:
    from blobmount.index import IndexView
    from blobmount.sources import open_archive

    archive = open_archive(args.archive, registry_options(args))
    return archive, IndexView(archive.index_bytes, blob_size=archive.data.size)


def cmd_ls(args: argparse.Namespace) -> int:
    archive, view = _open_view(args)
    path = _arch_path(args.path)
    found = view.resolve(path)
    out = sys.stdout.buffer
    rows = [(view.entry(found).name, found)] if found >= 0 else [(c.name, c.entry) for c in view.children(path)]
    for name, number in rows:
        if not args.long:
            out.write(name + b"\n")
            continue
        if number < 0:
            out.write(b"drwxr-xr-x %10s %10s %12s %s %s/\n" % (b"-", b"-", b"-", b" " * 19, name))
            continue
        e = view.entry(number)
        mode = stat.filemode(stat.S_IFREG | (e.mode & 0o777)).encode()
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.mtime_ns // 1_000_000_000)).encode()
        out.write(b"%s %10d %10d %12d %s %s\n" % (mode, e.uid, e.gid, e.original_size, when, name))
    out.flush()
    archive.data.close()
    return EXIT_OK


def cmd_cat(args: argparse.Namespace) -> int:
    from blobmount.cache import ContentStore
    from blobmount.reader import Reader

    archive, view = _open_view(args)
    path = _arch_path(args.path)
    number = view.resolve(path)
    if number < 0:
        raise IsADirectory(f"{args.path}: is a directory")
    entry = view.entry(number)
    out = sys.stdout.buffer

    async def run(store_dir: Path) -> None:
        from blobmount.sources.base import Fetching

        reader = Reader(archive.data, ContentStore(store_dir, max_bytes=1 << 62))
        try:
            async with contextlib.AsyncExitStack() as stack:
                if isinstance(archive.data, Fetching):
                    await stack.enter_async_context(archive.data.serving())
                async for block in reader.stream_verified(entry):
                    out.write(block)
                out.flush()
        finally:
            await archive.data.aclose()

    import tempfile

    # Decoded zstd content is spooled to a private temp dir: verified before the first byte leaves.
    with tempfile.TemporaryDirectory(prefix="blobmount-cat-") as tmp:
        os.chmod(tmp, 0o700)
        run_interruptible(run, Path(tmp))
    archive.data.close()
    return EXIT_OK


def cmd_cp(args: argparse.Namespace) -> int:
    from blobmount.config import parse_size
    from blobmount.extract import CopyOptions
    from blobmount.extract.run import check_dest, copy_archive

    if args.concurrency < 1:
        raise UsageError("--concurrency: at least 1")
    options = CopyOptions(
        concurrency=args.concurrency,
        buffer_bytes=parse_size(args.buffer),
        overwrite=args.overwrite,
        preserve_mode=args.preserve_mode,
        preserve_times=args.preserve_times,
        fsync=args.fsync,
        clean_dest=args.clean_dest,
        progress=args.progress,
    )
    cache = cache_config(args, cache_dir_of(args))
    dest = os.fsencode(args.dest)
    check_dest(dest, options, cache)  # refused before the archive is even opened
    paths = [os.fsencode(p) for p in args.paths]
    started = time.monotonic()

    def registry() -> RegistryOptions:
        return registry_options(args)

    result = run_interruptible(copy_archive, args.archive, paths, dest, options, registry, cache)
    print(
        f"{result.files} files, {result.bytes} bytes written to {args.dest}"
        + (f", {result.skipped} already there (skipped)" if result.skipped else "")
        + f" ({time.monotonic() - started:.2f} s)"
    )
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    from blobmount.create import create_archive

    notes: dict[str, str] = {}
    for item in args.annotation:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--annotation {item!r}: expected KEY=VALUE")
        notes[key] = value
    import tempfile

    with tempfile.TemporaryDirectory(prefix="blobmount-push-") as tmp:
        if args.archive:
            _refuse_create_options(args)
            archive_dir = Path(args.src)
        else:
            archive_dir = Path(tmp)
            create_archive(args.src, archive_dir, create_options(args))
        from blobmount.sources import kind

        if kind(args.ref) == "oci":
            print(f"{args.ref}@{_push_oci(archive_dir, args.ref[4:], args.created, notes)}")
            return EXIT_OK

        from blobmount.reference import Reference

        ref = Reference.parse(args.ref)
        digest = run_interruptible(_push, archive_dir, ref, registry_options(args), args.created, notes, args.progress)
    print(f"{ref.registry}/{ref.repository}@{digest}")
    return EXIT_OK


def _refuse_create_options(args: argparse.Namespace) -> None:
    """`push --archive` sends the blobs as they are: a building option would be silently ignored,
    so naming one is a usage error (the defaults come from create_args itself, written once)."""
    probe = argparse.ArgumentParser(add_help=False)
    create_args(probe)
    given = [
        "--" + name.replace("_", "-")
        for name, default in vars(probe.parse_args([])).items()
        if getattr(args, name) != default
    ]
    if given:
        named = ", ".join(given)
        raise UsageError(f"{named}: push --archive pushes the archive as is; these build one from a directory")


def _push_oci(archive_dir: Path, spec: str, created: str | None, notes: dict[str, str]) -> str:
    from blobmount.errors import DestinationError
    from blobmount.manifest import CREATED_ANNOTATION, archive_manifest, created_timestamp
    from blobmount.sources.oci_layout import write_oci_layout

    annotations = {CREATED_ANNOTATION: created_timestamp(created), **notes}
    manifest = archive_manifest(archive_dir, annotations)
    try:
        return write_oci_layout(archive_dir, spec, manifest)
    except OSError as exc:  # the archive was read above: this is the layout's side
        raise DestinationError(f"oci:{spec}: cannot write the layout: {exc.strerror or exc}") from exc


async def _push(
    archive_dir: Path,
    ref: Reference,
    options: RegistryOptions,
    created: str | None,
    notes: dict[str, str],
    progress: bool | None,
) -> str:
    from blobmount.registry.push import push_archive

    return str(await push_archive(archive_dir, ref, options, created=created, annotations=notes, progress=progress))


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    archive, view = _open_view(args)
    info = {
        "source": archive.name,
        "index_digest": archive.index_digest,
        "index_size": len(archive.index_bytes),
        "data_size": view.blob_size,
        "data_digest": f"sha256:{view.data_hash.hex()}" if view.data_hash else None,
        "entries": len(view),
        "order": view.order.value,
    }
    archive.data.close()
    referrers = _referrers(args, archive.name)
    if referrers is not None:
        info["referrers"] = referrers
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    for key, value in info.items():
        if key != "referrers":
            print(f"{key:13} {value}")
    for item in referrers or ():
        notes = item.get("annotations", {})
        created = notes.get("org.opencontainers.image.created", "-")
        print(f"{'referrer':13} {item['digest']} {item.get('artifactType', '-')} {created}")
    return EXIT_OK


def _referrers(args: argparse.Namespace, name: str) -> list[dict[str, Any]] | None:
    """A registry archive's referrers (prefetch profiles, signatures...) as descriptors; None for a
    local archive or when the registry would not list them (one warning: inspect still answers)."""
    from blobmount.sources import is_local

    if is_local(args.archive):
        return None
    import trio

    from blobmount.reference import Reference
    from blobmount.referrers import list_referrers
    from blobmount.registry.client import RegistryClient

    ref = Reference.parse(name)

    async def run() -> list[dict[str, Any]]:
        client = RegistryClient(ref, registry_options(args))
        try:
            assert ref.digest is not None
            return [r.as_json() for r in await list_referrers(client, ref.digest)]
        finally:
            await client.aclose()

    try:
        return trio.run(run)
    except BlobmountError as exc:
        log.warning("referrers of %s not listed: %s", name, exc)
        return None
