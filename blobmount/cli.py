"""argv -> frozen config -> subcommand; logging set-up; one-line errors and documented exit codes.

Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 invalid archive, 5 verification failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from blobmount import __version__
from blobmount.errors import EXIT_OK, EXIT_USAGE, BlobmountError, IsADirectory, UsageError, exit_code_for

log = logging.getLogger("blobmount")

SUBCOMMANDS = ("mount", "create", "ls", "cat")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="blobmount: %(levelname)s: %(message)s", stream=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blobmount",
        description="Mount a blob archive read-only; only the bytes read are fetched.",
        epilog="SOURCE: /path, ./path or dir:path (index.blob + data.blob), oci:PATH[:TAG]. "
        "`blobmount SOURCE MOUNTPOINT` is short for `blobmount mount SOURCE MOUNTPOINT`.",
    )
    p.add_argument("--version", action="version", version=f"blobmount {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("mount", help="mount SOURCE at MOUNTPOINT")
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

    ls = sub.add_parser("ls", help="list a directory of an archive")
    ls.add_argument("archive")
    ls.add_argument("path", nargs="?", default="")
    ls.add_argument("-l", dest="long", action="store_true", help="long listing")

    cat = sub.add_parser("cat", help="write a file of an archive to stdout (sha256-verified)")
    cat.add_argument("archive")
    cat.add_argument("path")
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
    result = create_archive(
        args.src_dir, args.out_dir, CreateOptions(args.compression, args.level, args.progress)
    )
    took = time.monotonic() - started
    print(
        f"{result.entries} files, data {result.data_size} bytes sha256:{result.data_sha256}, "
        f"index {result.index_size} bytes sha256:{result.index_sha256}"
        + (f", {result.skipped} skipped" if result.skipped else "")
        + f" ({took:.2f} s)"
    )
    return EXIT_OK


def _open_view(spec: str):  # type: ignore[no-untyped-def]
    from blobmount.index import IndexView
    from blobmount.source import open_local

    archive = open_local(spec)
    return archive, IndexView(archive.index_bytes, blob_size=archive.data.size)


def cmd_ls(args: argparse.Namespace) -> int:
    archive, view = _open_view(args.archive)
    path = _arch_path(args.path)
    found = view.resolve(path)
    out = sys.stdout.buffer
    if found >= 0:
        rows = [(view.entry(found).name, found)]
    else:
        rows = [(c.name, c.entry) for c in view.children(path)]
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

    archive, view = _open_view(args.archive)
    path = _arch_path(args.path)
    number = view.resolve(path)
    if number < 0:
        raise IsADirectory(f"{args.path}: is a directory")
    entry = view.entry(number)
    out = sys.stdout.buffer

    async def run(store_dir: Path) -> None:
        reader = Reader(archive.data, ContentStore(store_dir, max_bytes=1 << 62))
        async for block in reader.stream_verified(entry):
            out.write(block)
        out.flush()

    # Decoded zstd content is spooled to a private temp dir: verified before the first byte leaves.
    with tempfile.TemporaryDirectory(prefix="blobmount-cat-") as tmp:
        os.chmod(tmp, 0o700)
        trio.run(run, Path(tmp))
    archive.data.close()
    return EXIT_OK


def cmd_mount(args: argparse.Namespace) -> int:
    from blobmount.config import MountConfig, parse_size, split_o_options
    from blobmount.mount import run_mount

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
    )
    return run_mount(config)


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
    handlers = {"create": cmd_create, "ls": cmd_ls, "cat": cmd_cat, "mount": cmd_mount}
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


if __name__ == "__main__":
    sys.exit(main())
