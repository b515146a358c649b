"""argv -> frozen config -> subcommand; logging set-up; one-line errors and documented exit codes.

Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 invalid archive, 5 verification failed,
6 authentication refused.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from blobmount import __version__
from blobmount.errors import EXIT_OK, EXIT_USAGE, BlobmountError, IsADirectory, UsageError, exit_code_for

if TYPE_CHECKING:
    from blobmount.index import IndexView
    from blobmount.reference import Reference
    from blobmount.registry.options import RegistryOptions
    from blobmount.source import Archive

log = logging.getLogger("blobmount")

SUBCOMMANDS = ("mount", "create", "ls", "cat", "push", "inspect")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="blobmount: %(levelname)s: %(message)s", stream=sys.stderr)


def _registry_parent() -> argparse.ArgumentParser:
    r = argparse.ArgumentParser(add_help=False)
    g = r.add_argument_group("registry")
    g.add_argument(
        "--plain-http",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="talk to this registry over plain HTTP (repeatable)",
    )
    g.add_argument(
        "--insecure",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="do not verify this registry's TLS certificate (repeatable)",
    )
    g.add_argument("--ca-file", type=Path, help="extra CA bundle for TLS")
    g.add_argument("--username", help="registry user (password from --password-stdin or --password-file)")
    g.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    g.add_argument("--password-file", type=Path, help="read the password from a file (systemd LoadCredential=)")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds one operation may take across retries")
    g.add_argument("--max-connections", type=int, default=8, help="concurrent connections to the registry")
    g.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="a mirror (pull-through cache) tried before the registry (repeatable, in order)",
    )
    g.add_argument(
        "--hosts-dir",
        type=Path,
        help="containerd-style REGISTRY/hosts.toml mirror configs (default /etc/blobmount/certs.d)",
    )
    return r


def registry_options(args: argparse.Namespace) -> RegistryOptions:
    """Registry settings from flags; secrets only from stdin or a file, never argv or BLOBMOUNT_*."""
    from blobmount.registry.auth import Credentials, read_password_file
    from blobmount.registry.options import RegistryOptions

    creds = None
    if args.username:
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        elif args.password_file:
            password = read_password_file(args.password_file)
        else:
            raise UsageError("--username needs --password-stdin or --password-file")
        creds = Credentials(args.username, password)
    elif args.password_stdin or args.password_file:
        raise UsageError("--password-stdin/--password-file need --username")
    if args.timeout <= 0 or args.max_connections <= 0:
        raise UsageError("--timeout and --max-connections must be positive")
    return RegistryOptions(
        plain_http=tuple(args.plain_http),
        insecure=tuple(args.insecure),
        ca_file=args.ca_file,
        credentials=creds,
        timeout_s=args.timeout,
        max_connections=args.max_connections,
        mirrors=tuple(args.mirror),
        hosts_dir=args.hosts_dir,
    )


def _parser() -> argparse.ArgumentParser:
    reg = _registry_parent()
    p = argparse.ArgumentParser(
        prog="blobmount",
        description="Mount a blob archive read-only; only the bytes read are fetched.",
        epilog="SOURCE: /path, ./path or dir:path (index.blob + data.blob), oci:PATH[:TAG]. "
        "`blobmount SOURCE MOUNTPOINT` is short for `blobmount mount SOURCE MOUNTPOINT`.",
    )
    p.add_argument("--version", action="version", version=f"blobmount {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("mount", help="mount SOURCE at MOUNTPOINT", parents=[reg])
    m.add_argument("source")
    m.add_argument("mountpoint")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options: cache_dir=, cache_size=, verify=, uid=, gid=, allow_other, "
        "default_permissions, fsname=, subtype=; mount(8)'s generic options are ignored",
    )
    m.add_argument("--cache-dir", type=Path)
    m.add_argument("--cache-size", default=None, help="hard limit of the cache directory (default 10G)")
    m.add_argument(
        "--verify",
        choices=("lazy", "strict"),
        default=None,
        help="lazy (default): large raw files are verified once fully read; strict: "
        "every file is verified before its first byte is served",
    )
    m.add_argument(
        "--verify-threshold",
        default=None,
        help="raw files up to this size are verified before the first byte (default 4M)",
    )
    m.add_argument("--uid", type=int, help="present every file as owned by this uid")
    m.add_argument("--gid", type=int, help="present every file as owned by this gid")
    m.add_argument(
        "--owner-self", action="store_true", help="present everything as owned by the mounting user and group"
    )
    m.add_argument("-d", "--debug", action="store_true", help="log every FUSE request")

    c = sub.add_parser("create", help="create an archive from a directory")
    c.add_argument("src_dir")
    c.add_argument("out_dir")
    c.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    c.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    ls = sub.add_parser("ls", help="list a directory of an archive", parents=[reg])
    ls.add_argument("archive")
    ls.add_argument("path", nargs="?", default="")
    ls.add_argument("-l", dest="long", action="store_true", help="long listing")

    cat = sub.add_parser("cat", help="write a file of an archive to stdout (sha256-verified)", parents=[reg])
    cat.add_argument("archive")
    cat.add_argument("path")

    push = sub.add_parser("push", help="create an archive from SRC_DIR and push it to REF", parents=[reg])
    push.add_argument("src", help="source directory (or, with --archive, an archive directory)")
    push.add_argument("ref")
    push.add_argument("--archive", action="store_true", help="SRC is index.blob + data.blob: push as is")
    push.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    push.add_argument("--level", type=int, default=3)
    push.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE")
    push.add_argument("--created", help="RFC 3339 creation time (default: $SOURCE_DATE_EPOCH, else now)")
    push.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="default: on a terminal")

    ins = sub.add_parser("inspect", help="show what an archive is: digests, sizes, entries", parents=[reg])
    ins.add_argument("archive")
    ins.add_argument("--json", action="store_true")
    return p


def _normalize_argv(argv: list[str]) -> list[str]:
    """`blobmount [opts] SOURCE MNT` -> `blobmount [opts] mount SOURCE MNT` (subcommands win)."""
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            continue
        if arg in SUBCOMMANDS:
            return argv
        return [*argv[:i], "mount", *argv[i:]]
    return argv


def _arch_path(text: str) -> bytes:
    return os.fsencode(text.strip("/"))


def cmd_create(args: argparse.Namespace) -> int:
    from blobmount.archive import CreateOptions, create_archive

    started = time.monotonic()
    result = create_archive(args.src_dir, args.out_dir, CreateOptions(args.compression, args.level, args.progress))
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
        reader = Reader(archive.data, ContentStore(store_dir, max_bytes=1 << 62))
        try:
            async for block in reader.stream_verified(entry):
                out.write(block)
            out.flush()
        finally:
            await archive.data.aclose()

    import tempfile

    import trio

    # Decoded zstd content is spooled to a private temp dir: verified before the first byte leaves.
    with tempfile.TemporaryDirectory(prefix="blobmount-cat-") as tmp:
        os.chmod(tmp, 0o700)
        trio.run(run, Path(tmp))
    archive.data.close()
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    from blobmount.archive import CreateOptions, create_archive

    notes: dict[str, str] = {}
    for item in args.annotation:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--annotation {item!r}: expected KEY=VALUE")
        notes[key] = value
    import tempfile

    with tempfile.TemporaryDirectory(prefix="blobmount-push-") as tmp:
        if args.archive:
            archive_dir = Path(args.src)
        else:
            archive_dir = Path(tmp)
            create_archive(args.src, archive_dir, CreateOptions(args.compression, args.level, args.progress))
        if args.ref.startswith("oci:"):
            print(f"{args.ref}@{_push_oci(archive_dir, args.ref[4:], args.created, notes)}")
            return EXIT_OK
        import trio

        from blobmount.reference import Reference

        ref = Reference.parse(args.ref)
        digest = trio.run(_push, archive_dir, ref, registry_options(args), args.created, notes, args.progress)
    print(f"{ref.registry}/{ref.repository}@{digest}")
    return EXIT_OK


def _push_oci(archive_dir: Path, spec: str, created: str | None, notes: dict[str, str]) -> str:
    from blobmount.manifest import CREATED_ANNOTATION, archive_manifest, created_timestamp
    from blobmount.source import write_oci_layout

    annotations = {CREATED_ANNOTATION: created_timestamp(created), **notes}
    return write_oci_layout(archive_dir, spec, archive_manifest(archive_dir, annotations))


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
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:13} {value}")
    return EXIT_OK


def cmd_mount(args: argparse.Namespace) -> int:
    from blobmount.config import MountConfig, parse_size, split_o_options

    ours, fuse_opts = split_o_options(args.options)
    cache_dir = args.cache_dir or (Path(ours["cache_dir"]) if "cache_dir" in ours else None)
    size_text = args.cache_size or ours.get("cache_size") or "10G"
    verify = args.verify or ours.get("verify") or "lazy"
    if verify not in ("lazy", "strict"):
        raise UsageError(f"invalid verify policy {verify!r} (lazy or strict)")
    threshold_text = args.verify_threshold or ours.get("verify_threshold") or "4M"
    uid = args.uid if args.uid is not None else int(ours["uid"]) if "uid" in ours else None
    gid = args.gid if args.gid is not None else int(ours["gid"]) if "gid" in ours else None
    if args.owner_self:
        uid, gid = os.getuid(), os.getgid()
    config = MountConfig(
        source=args.source,
        mountpoint=Path(args.mountpoint),
        foreground=args.foreground,
        cache_dir=cache_dir,
        cache_size=parse_size(size_text),
        verify=verify,
        verify_threshold=parse_size(threshold_text),
        uid=uid,
        gid=gid,
        fuse_options=tuple(fuse_opts),
        debug=args.debug,
        registry=registry_options(args),
    )
    # the source is opened on a thread from here on: its round trips to a registry overlap the
    # imports below, which only the daemon needs (pyfuse3, the reader, the caches)
    from blobmount.sources import Opening

    opening = Opening(config.source, config.registry, cache_dir=config.cache_dir, cache_size=config.cache_size)
    opening.wait_talking()
    from blobmount.mount import run_mount

    return run_mount(config, opening)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = _normalize_argv(list(sys.argv[1:] if argv is None else argv))
    parser = _parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    _setup_logging(args.verbose + (2 if getattr(args, "debug", False) else 0))
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    handlers = {
        "create": cmd_create,
        "ls": cmd_ls,
        "cat": cmd_cat,
        "mount": cmd_mount,
        "push": cmd_push,
        "inspect": cmd_inspect,
    }
    try:
        code: int = handlers[args.command](args)
        return code
    except BlobmountError as exc:
        print(f"blobmount: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """`mount.fuse.blobmount SOURCE MOUNTPOINT [-o OPTS] [-n] [-s] [-f] [-v]`, as mount(8) calls it
    for `mount -t fuse.blobmount` and fstab lines: -o options go through the one -o table (mount's
    generic ones are ignored there); -n (no mtab), -s (sloppy), -f (fake), -v are mount's own."""
    args = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    fake = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-o" and i + 1 < len(args):
            options += ["-o", args[i + 1]]
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            options += ["-o", arg[2:]]
        elif arg == "-f":
            fake = True
        elif arg in ("-n", "-s", "-v"):
            pass
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        print("usage: mount.fuse.blobmount SOURCE MOUNTPOINT [-o OPTIONS]", file=sys.stderr)
        return EXIT_USAGE
    if fake:
        return EXIT_OK
    return main(["mount", positional[0], positional[1], *options])


def _exit_now(code: int) -> NoReturn:
    """End the process without tearing the interpreter down: once a command is done nothing is
    left to clean up (files are closed, temporary directories gone, the daemon is its own
    process), and freeing every module of the mount's parent takes 15-45 ms that the caller of
    `blobmount SOURCE MNT` would wait for. Logging and the standard streams are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away, a closed stream
            stream.flush()
    os._exit(code)


def run() -> NoReturn:
    """The `blobmount` command (console script and `python -m blobmount.cli`)."""
    _exit_now(main())


def run_mount_helper() -> NoReturn:
    """The `mount.fuse.blobmount` command."""
    _exit_now(mount_helper())


if __name__ == "__main__":
    run()
