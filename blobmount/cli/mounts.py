"""The commands around a mount and its cache: mount, prefetch, cache status/prune, profile, status."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from blobmount.errors import EXIT_OK, UsageError

if TYPE_CHECKING:
    from blobmount.reference import Reference
    from blobmount.registry.options import RegistryOptions

from blobmount.cli.options import cache_config, cache_dir_of, mount_config, registry_options
from blobmount.cli.runner import run_interruptible


def cmd_prefetch(args: argparse.Namespace) -> int:
    from blobmount.prefetch import prefetch_archive

    cache = cache_config(args, cache_dir_of(args))

    def registry() -> RegistryOptions:
        return registry_options(args)

    started = time.monotonic()
    fetched, total = run_interruptible(prefetch_archive, args.archive, args.paths, registry, cache, args.progress)
    print(f"{total} bytes in the cache ({fetched} fetched, {time.monotonic() - started:.2f} s)")
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    import json

    from blobmount.cache import CacheDir
    from blobmount.config import parse_size

    path = cache_dir_of(args)
    if not path.is_dir():
        raise UsageError(f"cache dir {path}: does not exist")
    cache = CacheDir(path, 1 << 62)
    if args.cache_command == "prune":
        count, freed = cache.prune(parse_size(args.size))
        print(f"evicted {count} files, {freed} bytes; {cache.usage().accounted_bytes} bytes remain in {path}")
        return EXIT_OK
    files = cache.scan()
    total = cache.resync()
    blobs: dict[str, int] = {}
    content = 0
    for f in files:
        rel = f.path.relative_to(path).parts
        if rel[0] == "chunks" and len(rel) >= 2:
            blobs[rel[1]] = blobs.get(rel[1], 0) + f.size
        elif rel[0] == "content":
            content += f.size
    info = {"cache_dir": str(path), "bytes": total, "files": len(files), "content_bytes": content, "chunks": blobs}
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"{path}: {total} bytes in {len(files)} files")
    print(f"  decoded contents: {content} bytes")
    for name, size in sorted(blobs.items(), key=lambda kv: -kv[1]):
        print(f"  chunks {name}: {size} bytes")
    return EXIT_OK


def cmd_mount(args: argparse.Namespace) -> int:
    config = mount_config(args)
    if config.follow.enabled:
        from blobmount.follow import check_followable

        check_followable(config.source, config.remote.offline)
    # the source is opened on a thread from here on: its round trips to a registry overlap the
    # imports below, which only the daemon needs (pyfuse3, the reader, the caches)
    from blobmount.sources import Opening

    opening = Opening(
        config.source,
        config.registry,
        cache_dir=config.cache.dir,
        cache_size=config.cache.size_bytes,
        chunk_size=config.cache.chunk_size,
        offline=config.remote.offline,
        stale_tag=config.remote.stale_tag,
    )
    opening.wait_talking()
    from blobmount.mount import run_mount

    return run_mount(config, opening)


def cmd_profile(args: argparse.Namespace) -> int:
    from blobmount import profile

    if args.profile_command == "save":
        from blobmount.daemon.control import ask, find_daemon

        path, _ = find_daemon(args.mountpoint, args.socket)
        doc = ask(path, "profile", limit=4 * profile.MAX_PROFILE_BYTES)["profile"]
        try:
            profile.write(doc, args.file)
        except OSError as exc:
            raise UsageError(f"{args.file}: {exc.strerror}") from None
        print(f"{len(doc['entries'])} entries written to {args.file}")
        return EXIT_OK
    from blobmount.reference import Reference

    data = profile.read_file(args.file)
    parsed = profile.parse(data, args.file)  # refused here rather than published
    ref = Reference.parse(args.ref)
    digest = run_interruptible(_push_profile, ref, registry_options(args), data, parsed)
    print(f"{ref.registry}/{ref.repository}@{digest}")
    return EXIT_OK


async def _push_profile(ref: Reference, options: RegistryOptions, data: bytes, parsed: Any) -> str:
    from blobmount.referrers import push_profile

    return str(await push_profile(ref, options, data, parsed.created, len(parsed.entries), parsed.index_digest))


def cmd_status(args: argparse.Namespace) -> int:
    from blobmount.daemon.status import status_command

    return status_command(args.mountpoint, json_out=args.json, socket_path=args.socket)
