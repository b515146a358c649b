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
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from blobmount import __version__
from blobmount.errors import EXIT_OK, EXIT_USAGE, BlobmountError, IsADirectory, UsageError, exit_code_for

if TYPE_CHECKING:
    from blobmount.archive import CreateOptions
    from blobmount.index import IndexView
    from blobmount.reference import Reference
    from blobmount.registry.options import RegistryOptions
    from blobmount.source import Archive

log = logging.getLogger("blobmount")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what is wrong and where the help is, not the whole usage
    (the usage of `mount` alone is 16 lines, which buried the one that mattered). Exit 2 as ever;
    subparsers are made of this class too (argparse's parser_class default)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"blobmount: {message} (see `{self.prog} --help`)\n")


def _common_parent(top: bool) -> _Parser:
    """Options every command takes, before or after the command name (subcommands' copies default to
    SUPPRESS so they never overwrite a value given before the command)."""
    from blobmount.logs import FORMATS, LEVELS

    def dflt(value: object) -> object:
        return value if top else argparse.SUPPRESS

    c = _Parser(add_help=False)
    g = c.add_argument_group("logging and configuration")
    g.add_argument("-v", "--verbose", action="count", default=dflt(0), help="more log output (-vv: debug)")
    g.add_argument(
        "--log-level", choices=LEVELS, default=dflt(None), help="log threshold (default warning; -v info, -vv debug)"
    )
    g.add_argument("--log-format", choices=FORMATS, default=dflt("text"), help="text (default) or json")
    g.add_argument(
        "--config", type=Path, default=dflt(None), help="TOML file (default /etc/blobmount/config.toml if present)"
    )
    return c


def _registry_parent() -> _Parser:
    r = _Parser(add_help=False)
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

    known = getattr(args, "registry_options", None)
    if isinstance(known, RegistryOptions):  # asked twice (inspect and its referrers): stdin is read once
        return known
    creds = None
    if args.username:
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        elif args.password_file:
            password = read_password_file(args.password_file)
        elif getattr(args, "config_password", None):  # settings.py checked the file is 0600
            password = args.config_password
        else:
            raise UsageError("--username needs --password-stdin or --password-file")
        creds = Credentials(args.username, password)
    elif args.password_stdin or args.password_file:
        raise UsageError("--password-stdin/--password-file need --username")
    if args.timeout <= 0 or args.max_connections <= 0:
        raise UsageError("--timeout and --max-connections must be positive")
    options = args.registry_options = RegistryOptions(
        plain_http=tuple(args.plain_http),
        insecure=tuple(args.insecure),
        ca_file=args.ca_file,
        credentials=creds,
        timeout_s=args.timeout,
        max_connections=args.max_connections,
        mirrors=tuple(args.mirror),
        hosts_dir=args.hosts_dir,
    )
    return options


def _parser() -> argparse.ArgumentParser:
    reg = _registry_parent()
    common = _common_parent(top=False)
    p = _Parser(
        prog="blobmount",
        parents=[_common_parent(top=True)],
        description="Mount a blob archive read-only; only the bytes read are fetched.",
        epilog="SOURCE: /path, ./path or dir:path (index.blob + data.blob), oci:PATH[:TAG]. "
        "`blobmount SOURCE MOUNTPOINT` is short for `blobmount mount SOURCE MOUNTPOINT`.",
    )
    p.add_argument("--version", action="version", version=f"blobmount {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("mount", help="mount SOURCE at MOUNTPOINT", parents=[reg, common])
    m.add_argument("source", nargs="?", help="(or $BLOBMOUNT_SOURCE)")
    m.add_argument("mountpoint", nargs="?", help="(or $BLOBMOUNT_MOUNTPOINT)")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options: cache_dir=, cache_size=, chunk_size=, verify=, uid=, gid=, offline, no_stale_tag, "
        "nonempty, prefetch=, follow, follow_interval=, follow_keep=, allow_other, default_permissions, fsname=, "
        "subtype=; mount(8)'s generic options are ignored",
    )
    cache_args(m)
    m.add_argument(
        "--verify",
        choices=VERIFY_POLICIES,
        default=None,
        help="lazy (default): large raw files are verified once fully read; background: also read "
        "the rest of an opened large file in the background to verify it; strict: every file is "
        "verified before its first byte is served",
    )
    m.add_argument(
        "--offline",
        action="store_true",
        help="never touch the network: serve what the cache holds (a tag resolves as it did last time)",
    )
    m.add_argument(
        "--no-stale-tag",
        action="store_true",
        help="when the registry does not answer, fail instead of mounting the digest the cache remembers for the tag",
    )
    m.add_argument(
        "--follow",
        action="store_true",
        help="re-resolve the tag every --follow-interval and switch to a new archive atomically "
        "(open files keep reading the archive they were opened on); SIGHUP checks at once",
    )
    m.add_argument(
        "--follow-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how often --follow checks the tag (default 60)",
    )
    m.add_argument(
        "--follow-keep",
        type=int,
        default=None,
        metavar="N",
        help="archives kept at most under --follow: the one served and older ones still open (default 2)",
    )
    m.add_argument(
        "--nonempty",
        action="store_true",
        help="mount even if MOUNTPOINT has entries (the mount hides them while it lasts)",
    )
    m.add_argument(
        "--prefetch",
        action="append",
        default=[],
        metavar="PATH",
        help="once mounted, fetch this file or directory into the cache (repeatable)",
    )
    m.add_argument(
        "--record-profile",
        action="store_true",
        help="record the order in which files (and ranges of large files) are first read; written on "
        "unmount to CACHE_DIR/meta/profiles/<index digest hex>.json, or any time by `blobmount profile save`",
    )
    m.add_argument(
        "--record-seconds",
        type=float,
        default=None,
        help="stop recording this many seconds after the mount (default 120)",
    )
    m.add_argument(
        "--prefetch-profile",
        default=None,
        metavar="auto|FILE|none",
        help="once mounted, fetch what a prefetch profile names, in its order: auto = the newest one "
        "pushed for the archive (`blobmount profile push`), FILE, or none (default)",
    )
    m.add_argument(
        "--read-ahead-kb",
        type=int,
        default=None,
        help="kernel read-ahead for the mount, KiB (default 1024; 0 keeps the kernel's 128; needs root)",
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
    m.add_argument(
        "--metrics",
        metavar="[HOST]:PORT",
        help="serve Prometheus /metrics, /healthz and /readyz on this address (':PORT' = every interface)",
    )

    st = sub.add_parser("status", help="ask the daemon serving MOUNTPOINT how it is doing", parents=[common])
    st.add_argument("mountpoint")
    st.add_argument("--json", action="store_true", help="the daemon's answer as JSON")
    st.add_argument("--socket", type=Path, help="the daemon's control socket (default: found from MOUNTPOINT)")

    c = sub.add_parser("create", help="create an archive from a directory", parents=[common])
    c.add_argument("src_dir")
    c.add_argument("out_dir")
    create_args(c)
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    ls = sub.add_parser("ls", help="list a directory of an archive", parents=[reg, common])
    ls.add_argument("archive")
    ls.add_argument("path", nargs="?", default="")
    ls.add_argument("-l", dest="long", action="store_true", help="long listing")

    cat = sub.add_parser("cat", help="write a file of an archive to stdout (sha256-verified)", parents=[reg, common])
    cat.add_argument("archive")
    cat.add_argument("path")

    cpp = sub.add_parser(
        "cp",
        help="copy files or a directory of an archive into DEST (sha256-verified, no mount)",
        parents=[reg, common],
        description="cp SOURCE PATH... DEST: each file lands at DEST/<its path in the archive>. "
        "cp SOURCE DIR DEST: the directory's files land at DEST/<path below DIR> ('.' is the whole archive).",
    )
    cpp.add_argument("archive", metavar="SOURCE")
    cpp.add_argument("paths", nargs="+", metavar="PATH", help="files, or one directory")
    cpp.add_argument("dest", metavar="DEST")
    cpp.add_argument("--concurrency", type=int, default=4, help="range reads in flight (default 4)")
    cpp.add_argument("--buffer", default="64M", help="fetched bytes held in memory at most (default 64M)")
    cpp.add_argument("--overwrite", action="store_true", help="replace files already in DEST (default: skip them)")
    cpp.add_argument("--preserve-mode", action="store_true", help="the archive's permission bits (default: umask)")
    cpp.add_argument("--preserve-times", action="store_true", help="the archive's mtimes (directories: as mounted)")
    cpp.add_argument("--fsync", action="store_true", help="fsync each file before renaming it into place")
    cpp.add_argument("--clean-dest", action="store_true", help="empty DEST first (refused for /, the cwd, the cache)")
    cpp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="default: on a terminal")
    cache_args(cpp)

    push = sub.add_parser("push", help="create an archive from SRC_DIR and push it to REF", parents=[reg, common])
    push.add_argument("src", help="source directory (or, with --archive, an archive directory)")
    push.add_argument("ref")
    push.add_argument("--archive", action="store_true", help="SRC is index.blob + data.blob: push as is")
    create_args(push)
    push.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE")
    push.add_argument("--created", help="RFC 3339 creation time (default: $SOURCE_DATE_EPOCH, else now)")
    push.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="default: on a terminal")

    ins = sub.add_parser("inspect", help="show what an archive is: digests, sizes, entries", parents=[reg, common])
    ins.add_argument("archive")
    ins.add_argument("--json", action="store_true")

    pf = sub.add_parser("prefetch", help="fetch files or directories of a remote archive into the cache", parents=[reg])
    pf.add_argument("archive")
    pf.add_argument("paths", nargs="*", metavar="PATH", help="files or directories (default: everything)")
    cache_args(pf)
    pf.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    pr = sub.add_parser("profile", help="prefetch profiles: save a mount's, push one to a registry")
    pr_sub = pr.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    ps = pr_sub.add_parser("save", help="write the profile a --record-profile mount has recorded so far")
    ps.add_argument("mountpoint")
    ps.add_argument("file")
    ps.add_argument("--socket", type=Path, help="the daemon's control socket (default: found from MOUNTPOINT)")
    pp = pr_sub.add_parser(
        "push", help="push a profile as an OCI artifact whose subject is the archive REF names", parents=[reg]
    )
    pp.add_argument("ref")
    pp.add_argument("file")

    ca = sub.add_parser("cache", help="the cache directory: status, prune")
    ca_sub = ca.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    cs = ca_sub.add_parser("status", help="what the cache holds")
    cs.add_argument("--cache-dir", type=Path)
    cs.add_argument("--json", action="store_true")
    cp = ca_sub.add_parser("prune", help="evict least recently used files (works on a live cache)")
    cp.add_argument("--cache-dir", type=Path)
    cp.add_argument("--size", default="0", help="evict until at most this much remains (default 0: all unused)")
    return p


VERIFY_POLICIES = ("lazy", "strict", "background")


def create_args(p: argparse.ArgumentParser) -> None:
    """How `create` (and `push` from a directory) builds an archive: the reference writer's options."""
    g = p.add_argument_group("building the archive")
    g.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    g.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    g.add_argument(
        "--max-files",
        type=int,
        default=None,
        metavar="N",
        help="refuse a tree of more than N files (default: no limit; 0: the reference's 200000; -1: no limit)",
    )
    g.add_argument(
        "--change-detection",
        choices=("none", "strict"),
        default="none",
        help="strict: a file whose size or mtime changes while it is read fails the create (default none)",
    )
    g.add_argument(
        "--skip-compression",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store small files and already-compressed formats raw (default on; --no-skip-compression: "
        "compress every file)",
    )
    g.add_argument(
        "--skip-compression-below", metavar="SIZE", default=None, help="files smaller than this stay raw (default 1K)"
    )
    g.add_argument(
        "--skip-compression-ext",
        action="append",
        default=None,
        metavar="EXT[,EXT...]",
        help="extensions stored raw, replacing the default list (repeatable; '' for none)",
    )
    g.add_argument(
        "--threads", type=int, default=0, metavar="N", help="zstd compression threads (default 0: one per core)"
    )


def create_options(args: argparse.Namespace) -> CreateOptions:
    from blobmount.archive import SKIP_BELOW_BYTES, SKIP_EXTENSIONS, CreateOptions, extension_list
    from blobmount.config import parse_size

    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: 0 (one per core) or more")
    below = parse_size(args.skip_compression_below) if args.skip_compression_below is not None else SKIP_BELOW_BYTES
    exts = args.skip_compression_ext
    return CreateOptions(
        compression=args.compression,
        level=args.level,
        progress=args.progress,
        max_files=args.max_files,
        change_detection=args.change_detection,
        skip_compression=args.skip_compression,
        skip_below=below,
        skip_extensions=SKIP_EXTENSIONS if exts is None else extension_list(",".join(exts)),
        threads=args.threads,
    )


def cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, help="the cache directory (shared by every process naming it)")
    p.add_argument("--cache-size", default=None, help="hard limit of the cache directory (default 10G)")
    p.add_argument("--chunk-size", default=None, help="unit of remote fetches and of the chunk cache (default 1M)")


def _normalize_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`blobmount [opts] [SOURCE MNT]` -> `blobmount mount [opts] [SOURCE MNT]` unless a subcommand
    is named (subcommands win); values of options are skipped, so `--cache-dir mount` is no command.
    Without positionals it is still a mount: SOURCE and MOUNTPOINT may come from BLOBMOUNT_*."""
    from blobmount.settings import subparsers

    subs = subparsers(parser)
    takes_value = {
        opt for p in (parser, *subs.values()) for a in p._actions if a.nargs != 0 for opt in a.option_strings
    }
    i = 0
    while i < len(argv) and argv[i] != "--":
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            if arg in subs:
                return argv
            break
        i += 2 if arg in takes_value else 1
    if not argv or any(a in ("-h", "--help", "--version") for a in argv):
        return argv
    return ["mount", *argv]


def _arch_path(text: str) -> bytes:
    return os.fsencode(text.strip("/"))


def cmd_create(args: argparse.Namespace) -> int:
    from blobmount.archive import create_archive

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
        from blobmount.fetch import ChunkedSource

        reader = Reader(archive.data, ContentStore(store_dir, max_bytes=1 << 62))
        try:
            async with contextlib.AsyncExitStack() as stack:
                if isinstance(archive.data, ChunkedSource):
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
    from blobmount.extract import CopyOptions, check_clean_dest, copy_items, first_error, plan

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
    dest = os.fsencode(args.dest)
    cache_dir = os.fsencode(_cache_dir(args))
    if options.clean_dest:
        check_clean_dest(dest, cache_dir)  # refused before the archive is even opened
    started = time.monotonic()

    async def run() -> tuple[int, int, int]:
        from blobmount.cache import CacheDir
        from blobmount.fetch import ChunkedSource
        from blobmount.index import IndexView
        from blobmount.source import open_local
        from blobmount.sources import RemoteSettings, is_local, open_remote

        if is_local(args.archive):
            archive = open_local(args.archive)
        else:
            cache = CacheDir(Path(os.fsdecode(cache_dir)), parse_size(args.cache_size or "10G"))
            settings = RemoteSettings(cache, _chunk_size(args.chunk_size))
            archive = await open_remote(args.archive, registry_options(args), settings)
        data = archive.data
        try:
            view = IndexView(archive.index_bytes, blob_size=data.size)
            try:
                async with contextlib.AsyncExitStack() as stack:
                    on_span = None
                    if isinstance(data, ChunkedSource):
                        await stack.enter_async_context(data.serving())  # a nursery: errors come grouped
                        remote = data

                        def on_span(start: int, end: int) -> None:
                            # A directory's first half --buffer fetched while its entries are
                            # validated (into the chunk cache; DEST is untouched until the plan
                            # holds), as one request: the copy consumes it in order, and one stream
                            # delivers it in order at full speed where parallel ones finish together.
                            # Half: a piece then waits for at most as many bytes as four readers of
                            # --buffer/4 did (--timeout applies to each read).
                            end = min(end, start + options.buffer_bytes // 2)
                            remote.prefetch(start, end, request_bytes=end - start)

                    items = plan(view, [os.fsencode(p) for p in args.paths], on_span)  # nothing written before
                    result = await copy_items(
                        data, items, dest, options, cache_dir=cache_dir, created_ns=archive.created_ns
                    )
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            return result.files, result.skipped, result.bytes
        finally:
            await data.aclose()
            data.close()

    files, skipped, nbytes = run_interruptible(run)
    print(
        f"{files} files, {nbytes} bytes written to {args.dest}"
        + (f", {skipped} already there (skipped)" if skipped else "")
        + f" ({time.monotonic() - started:.2f} s)"
    )
    return EXIT_OK


_T = TypeVar("_T")


def run_interruptible(fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """``trio.run(fn, *args)`` for the commands that talk to a registry for long (push, cat,
    prefetch), with Ctrl-C turned into an orderly cancellation and KeyboardInterrupt (exit 130)
    once everything has unwound. trio's default raises KeyboardInterrupt wherever the code happens
    to be; inside an HTTP library's critical section that can leave a lock held that a later
    shielded clean-up then waits for: a push interrupted during a stalled upload once hung so."""
    import signal

    import trio

    async def main() -> _T:
        interrupted = False
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            try:
                async with trio.open_nursery() as nursery:

                    async def watch() -> None:
                        nonlocal interrupted
                        async for _ in signals:
                            interrupted = True
                            nursery.cancel_scope.cancel()
                            return

                    nursery.start_soon(watch)
                    result = await fn(*args)
                    nursery.cancel_scope.cancel()
            except BaseException as exc:
                if interrupted:
                    raise KeyboardInterrupt from None
                raise _unwrapped(exc) from None  # fn's own error (watch never raises)
        if interrupted:
            raise KeyboardInterrupt
        return result

    return trio.run(main)


def _unwrapped(exc: BaseException) -> BaseException:
    """The error inside the groups trio's nurseries wrap it in: a command's own nursery, then the
    chunk fetcher's (`cat` of a registry file that failed verification once printed the two groups'
    53-line traceback and exited 1, where IntegrityError means exit 5). A group of several errors
    that are all ours stands for its first; anything else stays as it is (a bug shows in full)."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = _leaves(exc)
        if len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        elif leaves and all(isinstance(e, BlobmountError) for e in leaves):
            return leaves[0]
        else:
            return exc
    return exc


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def cmd_push(args: argparse.Namespace) -> int:
    from blobmount.archive import create_archive

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
        if args.ref.startswith("oci:"):
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
    from blobmount.source import write_oci_layout

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


def _chunk_size(text: str | None) -> int | None:
    """--chunk-size, checked; None for the chunk store's default."""
    from blobmount.config import parse_size

    if text is None:
        return None
    size = parse_size(text)
    if not (4 << 10) <= size <= (64 << 20) or size & (size - 1):
        raise UsageError(f"--chunk-size {text}: a power of two from 4K to 64M")
    return size


def _read_ahead(flag: int | None, option: str | None) -> int:
    value = flag if flag is not None else int(option) if option and option.isdigit() else 1024
    if option and not option.isdigit():
        raise UsageError(f"-o read_ahead_kb={option}: a number of KiB")
    if not 0 <= value <= 1 << 20:
        raise UsageError("--read-ahead-kb: 0 to 1048576")
    return value


def _positive(flag: str, value: float | None, option: str | None, default: float) -> float:
    """A number > 0 from its flag, else its -o key, else the default."""
    if value is None and option is not None:
        try:
            value = float(option)
        except ValueError:
            raise UsageError(f"-o {flag.lstrip('-').replace('-', '_')}={option}: a number") from None
    if value is None:
        return default
    if not value > 0:
        raise UsageError(f"{flag} {value:g}: must be more than 0")
    return value


def _cache_dir(args: argparse.Namespace) -> Path:
    from blobmount.cache import default_cache_dir

    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def cmd_prefetch(args: argparse.Namespace) -> int:

    from blobmount.cache import CacheDir
    from blobmount.config import parse_size
    from blobmount.fetch import ChunkedSource
    from blobmount.index import IndexView
    from blobmount.prefetch import ranges_for
    from blobmount.sources import RemoteSettings, is_local, open_remote

    if is_local(args.archive):
        raise UsageError(f"{args.archive}: a local archive needs no prefetch (its bytes are on this machine)")
    cache = CacheDir(_cache_dir(args), parse_size(args.cache_size or "10G"))
    settings = RemoteSettings(cache, _chunk_size(args.chunk_size))
    show = sys.stderr.isatty() if args.progress is None else args.progress
    started = time.monotonic()

    async def run() -> tuple[int, int]:
        archive = await open_remote(args.archive, registry_options(args), settings)
        data = archive.data
        view = IndexView(archive.index_bytes, blob_size=data.size)
        ranges = ranges_for(view, args.paths or [""])
        total = sum(b - a for a, b in ranges)
        last = 0.0

        def progress(done: int, whole: int) -> None:
            nonlocal last
            if show and (time.monotonic() - last > 0.2 or done == whole):
                last = time.monotonic()
                print(f"\rprefetch: {done >> 20}/{whole >> 20} MiB", end="", file=sys.stderr, flush=True)

        try:
            if not isinstance(data, ChunkedSource):
                return 0, total  # the whole blob is local already (a registry without ranges)
            async with data.serving():
                fetched = await data.fill(ranges, progress)
            return fetched, total
        finally:
            if show:
                print(file=sys.stderr)
            await data.aclose()

    fetched, total = run_interruptible(run)
    print(f"{total} bytes in the cache ({fetched} fetched, {time.monotonic() - started:.2f} s)")
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    import json

    from blobmount.cache import CacheDir
    from blobmount.config import parse_size

    path = _cache_dir(args)
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
    from blobmount.config import MountConfig, parse_size, split_o_options
    from blobmount.settings import clamp_timeout, kernel_request_timeout, request_bound

    if not args.source or not args.mountpoint:
        raise UsageError("mount needs SOURCE and MOUNTPOINT (arguments, or BLOBMOUNT_SOURCE and BLOBMOUNT_MOUNTPOINT)")
    ours, fuse_opts = split_o_options(args.options)
    cache_dir = args.cache_dir or (Path(ours["cache_dir"]) if "cache_dir" in ours else None)
    size_text = args.cache_size or ours.get("cache_size") or "10G"
    verify = args.verify or ours.get("verify") or "lazy"
    if verify not in VERIFY_POLICIES:
        raise UsageError(f"invalid verify policy {verify!r} ({', '.join(VERIFY_POLICIES)})")
    threshold_text = args.verify_threshold or ours.get("verify_threshold") or "4M"
    uid = args.uid if args.uid is not None else int(ours["uid"]) if "uid" in ours else None
    gid = args.gid if args.gid is not None else int(ours["gid"]) if "gid" in ours else None
    if args.owner_self:
        uid, gid = os.getuid(), os.getgid()
    kernel_s = kernel_request_timeout()  # before the source opens: its requests obey --timeout too
    args.timeout, clamped = clamp_timeout(args.timeout, kernel_s)
    if clamped:
        log.warning("%s", clamped)
    config = MountConfig(
        source=args.source,
        mountpoint=Path(args.mountpoint),
        foreground=args.foreground,
        cache_dir=cache_dir,
        cache_size=parse_size(size_text),
        verify=verify,
        verify_threshold=parse_size(threshold_text),
        chunk_size=_chunk_size(args.chunk_size or ours.get("chunk_size")),
        offline=args.offline or "offline" in ours,
        no_stale_tag=args.no_stale_tag or "no_stale_tag" in ours,
        nonempty=args.nonempty or "nonempty" in ours,
        prefetch=tuple(args.prefetch) + ((ours["prefetch"],) if "prefetch" in ours else ()),
        read_ahead_kb=_read_ahead(args.read_ahead_kb, ours.get("read_ahead_kb")),
        uid=uid,
        gid=gid,
        fuse_options=tuple(fuse_opts),
        debug=args.debug,
        registry=registry_options(args),
        metrics=args.metrics,
        request_bound_s=request_bound(kernel_s),
        record_profile=args.record_profile or "record_profile" in ours,
        record_seconds=_record_seconds(args.record_seconds, ours.get("record_seconds")),
        prefetch_profile=_profile_setting(args.prefetch_profile or ours.get("prefetch_profile") or "none"),
        follow=args.follow or "follow" in ours,
        follow_interval_s=_positive("--follow-interval", args.follow_interval, ours.get("follow_interval"), 60.0),
        follow_keep=int(_positive("--follow-keep", args.follow_keep, ours.get("follow_keep"), 2)),
    )
    if config.follow_keep < 2:
        raise UsageError("--follow-keep: at least 2 (the archive served and the one before it)")
    if config.follow:
        from blobmount.follow import check_followable

        check_followable(config.source, config.offline)
    # the source is opened on a thread from here on: its round trips to a registry overlap the
    # imports below, which only the daemon needs (pyfuse3, the reader, the caches)
    from blobmount.sources import Opening

    opening = Opening(
        config.source,
        config.registry,
        cache_dir=config.cache_dir,
        cache_size=config.cache_size,
        chunk_size=config.chunk_size,
        offline=config.offline,
        stale_tag=not config.no_stale_tag,
    )
    opening.wait_talking()
    from blobmount.mount import run_mount

    return run_mount(config, opening)


def _profile_setting(value: str) -> str:
    """auto, none, or a file made absolute: the daemon reads it later, wherever it runs from."""
    return value if value in ("auto", "none") else os.path.abspath(value)


def _record_seconds(flag: float | None, option: str | None) -> float:
    from blobmount.profile import DEFAULT_RECORD_SECONDS

    try:
        value = flag if flag is not None else float(option) if option else DEFAULT_RECORD_SECONDS
    except ValueError:
        raise UsageError(f"-o record_seconds={option}: a number of seconds") from None
    if not 0 < value <= 86400 * 365:
        raise UsageError("--record-seconds: a positive number of seconds")
    return value


def cmd_profile(args: argparse.Namespace) -> int:
    from blobmount import profile

    if args.profile_command == "save":
        from blobmount.introspect import ask, find_daemon

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
    from blobmount.introspect import status_command

    return status_command(args.mountpoint, json_out=args.json, socket_path=args.socket)


def main(argv: Sequence[str] | None = None) -> int:
    from blobmount import logs
    from blobmount.settings import resolve

    parser = _parser()
    args_list = _normalize_argv(list(sys.argv[1:] if argv is None else argv), parser)
    try:
        resolved = resolve(parser, args_list)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    except UsageError as exc:
        print(f"blobmount: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = resolved.args
    logs.setup(args.log_level, args.log_format, args.verbose + (2 if getattr(args, "debug", False) else 0))
    for warning in resolved.warnings:
        log.warning("%s", warning)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    handlers = {
        "create": cmd_create,
        "ls": cmd_ls,
        "cat": cmd_cat,
        "cp": cmd_cp,
        "mount": cmd_mount,
        "push": cmd_push,
        "inspect": cmd_inspect,
        "prefetch": cmd_prefetch,
        "cache": cmd_cache,
        "status": cmd_status,
        "profile": cmd_profile,
    }
    logs.quiet_one_shot(args.command in _ONE_SHOT)
    try:
        try:
            code: int = handlers[args.command](args)
        except BaseExceptionGroup as group:  # a nursery's: the error inside is what happened
            raise _unwrapped(group) from None
        return code
    except BlobmountError as exc:
        print(f"blobmount: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    finally:
        logs.quiet_one_shot(False)


# Commands whose retry and verification lines are not shown (logs.quiet_one_shot): their error
# line is the news. `mount` only until its daemon serves (mount.py shows them from there on).
_ONE_SHOT = frozenset({"ls", "cat", "inspect", "mount"})


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
